"""Small evaluation files and turns for the evaluation tests (written to tmp dirs by the tests)."""

import json

from mmedagent.protocol import AssistantTurn, ToolCall, ToolOutcome, render_tool_results, render_turn

GOLD_BOX = [0.41, 0.54, 0.76, 0.75]
QUESTION = "Can you locate the tumor in this MRI image?"


def turn(value, *calls, thoughts="t"):
    return render_turn(AssistantTurn(thoughts=thoughts, actions=[ToolCall(API_name=n, API_params=p) for n, p in calls], value=value))


def grounding_record(rid="g1", question=QUESTION, box=GOLD_BOX, answer=None):
    """A project record: plan with 'grounding dino', gold tool output, final answer quoting the box."""
    out = ToolOutcome(tool="grounding dino", output={"boxes": [box], "logits": [0.95], "phrases": ["tumor"]})
    return {
        "id": rid,
        "image": "img.png",
        "task": "grounding",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "thoughts": "Locate it.", "value": "Please wait.",
             "actions": [{"API_name": "grounding dino", "API_params": {"image": "<imagepath>", "prompts": ["tumor"]}}]},
            {"from": "human", "value": render_tool_results([out], question)},
            {"from": "gpt", "thoughts": "Done.", "actions": [], "value": answer or f"The tumor is at {box}."},
        ],
    }


def direct_record(rid="d1", question="Is this a chest X-ray?", answer="Yes", answer_type="CLOSED"):
    return {
        "id": rid, "image": "img.png", "task": "vqa", "answer_type": answer_type,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "thoughts": "No tool needed.", "actions": [], "value": answer},
        ],
    }


def mmedagent_line(qid=7, box=GOLD_BOX):
    out = ToolOutcome(tool="grounding dino", output={"boxes": [box], "logits": [0.9], "phrases": ["cell"]})
    return {
        "question_id": qid, "type": "dino_cell", "image": "img.png", "pre_text": "Where are the cells?",
        "assist": turn("I will locate them.", ("grounding dino", {"image": "<imagepath>", "prompts": ["cell"]})),
        "text": render_tool_results([out], "Where are the cells?"),
        "fig_caption": "Cells in a histology slide.",
    }


# Lines of MMedAgent's released eval_agent_tool_use_all.jsonl, as published (texts shortened): gold turns
# with no space after the markers or an object left open ("API_params": {}]), tool outputs as plain text.
MMEDAGENT_EVAL_LINES = [
    {"question_id": 0, "type": "mrg", "image": "4cd60e22.jpg", "pre_text": "Are you able to derive a medical report from this image?",
     "assist": '"thoughts🤔"I will apply the ChatCAD-G tool.\n"actions🚀"[{"API_name": "ChatCAD-G","API_params": {}}]\n'
               '"value👉"Certainly! I will utilize a medical report generation tool.',
     "text": "ChatCAD-G output: The chest X-ray shows clear lung fields. No acute abnormalities are noted in the patient's bony "
             "structures.\n\nAnswer my first question: Are you able to derive a medical analysis from this image?"},
    {"question_id": 32, "type": "dino_disease", "image": "c394ead.jpg", "pre_text": " Can you identify the region affected by cardiomegaly? ",
     "assist": '"thoughts🤔"Using the grounding dino detection model.\n"actions🚀" [{"API_name": "grounding dino", '
               '"API_params": {"prompts": ["cardiomegaly"]}]\n"value👉"Initiating grounding dino. Hold tight.',
     "text": "grounding dino output: {'boxes': [[0.41, 0.53, 0.8, 0.65]], 'logits': [0.82], 'phrases': ['cardiomegaly']}"
             "\n\nAnswer my first question: Can you identify the region affected by cardiomegaly?"},
    {"question_id": 41, "type": "class", "image": "29998054_fig4.jpg", "pre_text": "Can you tell me the specific area this CT scan focuses on? ",
     "assist": '"thoughts🤔"I should employ a classification model.\n"actions🚀" [{"API_name": "BiomedClip", "API_params": {}]\n'
               '"value👉"I will use a classification model.',
     "text": "BiomedClip output: lung CT\n\nAnswer my first question: Can you tell me the specific area this CT scan focuses on?"},
    {"question_id": 51, "type": "rag", "pre_text": "What is Takayasu arteritis?",
     "assist": '"thoughts🤔"I will use the ChatCAD-R tool.\n"actions🚀" [{"API_name": "ChatCAD-R", "API_params":{}}]\n"value👉"Here it is:',
     "text": "ChatCAD-R output: '''\n开胸修补术后有时血管内支架植入术\n'''\n    \n\nAnswer my first question: What is Takayasu arteritis?"},
    {"question_id": 39, "type": "rag", "pre_text": "What are the implications of having Scleritis?",
     "assist": '"thoughts🤔"Retrieve.\n"actions🚀" [{"API_name": "ChatCAD-R", "API_params":{}}]\n"value👉"Here is the information:',
     "text": "ChatCAD-R output: ```\nKey steps include:\n1. **Medical Intervention:** Seek immediate medical attention.\n```"
             "\n\nAnswer my first question: What are the implications of having Scleritis?"},
]

# the lines whose tool outputs are plain text, not mappings, each with an image the tests provide
MMEDAGENT_TEXT_OUTPUT_LINES = [{**line, "image": "img.png"} for qid in (41, 0, 39)
                               for line in MMEDAGENT_EVAL_LINES if line["question_id"] == qid]


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def write_image(folder, name="img.png", size=(48, 40), value=90):
    from doubles import grey_image

    path = folder / name
    grey_image(size, value).save(path)
    return path
