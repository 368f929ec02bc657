"""Known-answer tests for the evaluation metrics (values worked out by hand in the comments)."""

import math

import numpy as np
import pytest

from doubles import FakeGrounding
from mmedagent.evaluation import metrics as M
from mmedagent.evaluation import tooluse as T
from mmedagent.protocol import ToolCall
from mmedagent.tools import registry


@pytest.fixture
def fake_grounding(monkeypatch):
    # discover the built-in tools first: a first discovery while the double holds the name 'grounding'
    # would skip the real grounding tool for the rest of the session (the demo model's tests need it)
    registry.list_tools()
    monkeypatch.setitem(registry._extra, FakeGrounding.name, FakeGrounding)
    return FakeGrounding


# --------------------------------------------------------------------------- boxes


def test_box_iou_and_grounding_iou():
    assert M.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # inter 1, union 4+4-1
    assert M.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    # gold box 1 best-matched at 1/7, gold box 2 missed -> mean (1/7 + 0) / 2
    assert M.grounding_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [10, 10, 11, 11]]) == pytest.approx(1 / 14)
    with pytest.raises(ValueError):
        M.box_iou([2, 0, 1, 1], [0, 0, 1, 1])


def test_average_precision_all_point_interpolation():
    gold = {"img1": [[0, 0, 10, 10]], "img2": [[0, 0, 10, 10], [20, 20, 30, 30]]}
    dets = [
        ("img1", 0.9, [0, 0, 10, 10]),  # TP
        ("img2", 0.8, [50, 50, 60, 60]),  # FP
        ("img2", 0.7, [0, 0, 10, 10]),  # TP
        ("img1", 0.6, [0, 0, 10, 10]),  # FP: duplicate of a matched box
    ]
    # recall 1/3,1/3,2/3,2/3; precision 1,1/2,2/3,1/2; envelope 1,2/3,2/3,1/2
    # AP = 1/3*1 + 1/3*2/3 = 5/9  (11-point VOC 2007 would give 6/11)
    assert M.average_precision(dets, gold) == pytest.approx(5 / 9)
    # the order of the input does not matter, the scores do
    assert M.average_precision(list(reversed(dets)), gold) == pytest.approx(5 / 9)
    # IoU exactly 0.5 counts as a hit at the 0.5 threshold; below does not
    assert M.average_precision([("a", 1.0, [0, 0, 10, 5])], {"a": [[0, 0, 10, 10]]}) == pytest.approx(1.0)
    assert M.average_precision([("a", 1.0, [0, 0, 10, 4])], {"a": [[0, 0, 10, 10]]}) == 0.0


def test_average_precision_does_not_depend_on_the_order_of_tied_scores():
    """Boxes quoted in answers all score 1: a hit and a miss are one point (recall 1/2, precision 1/2),
    whichever sample comes first in the data file (it read 0.5 one way round and 0.25 the other)."""
    gold = {"hit": [[0, 0, 10, 10]], "miss": [[0, 0, 10, 10]]}
    dets = [("hit", 1.0, [0, 0, 10, 10]), ("miss", 1.0, [50, 50, 60, 60])]
    assert M.average_precision(dets, gold) == M.average_precision(dets[::-1], gold) == pytest.approx(0.25)
    # distinct scores rank as before: a miss ranked first costs precision, a hit ranked first does not
    assert M.average_precision([("miss", 1.0, [50, 50, 60, 60]), ("hit", 0.9, [0, 0, 10, 10])], gold) == 0.25
    assert M.average_precision([("hit", 1.0, [0, 0, 10, 10]), ("miss", 0.9, [50, 50, 60, 60])], gold) == 0.5


def test_mean_average_precision_over_classes():
    gold = [("img1", "a", [0, 0, 10, 10]), ("img2", "a", [0, 0, 10, 10]), ("img2", "a", [20, 20, 30, 30]),
            ("img3", "b", [0, 0, 5, 5])]
    dets = [("img1", "a", 0.9, [0, 0, 10, 10]), ("img2", "a", 0.8, [50, 50, 60, 60]),
            ("img2", "a", 0.7, [0, 0, 10, 10]), ("img1", "a", 0.6, [0, 0, 10, 10]),
            ("img3", "b", 0.5, [0, 0, 5, 5]), ("img3", "c", 0.5, [0, 0, 5, 5])]  # class c has no gold: skipped
    assert M.mean_average_precision(dets, gold) == pytest.approx((5 / 9 + 1.0) / 2)


# --------------------------------------------------------------------------- masks


def test_dice_on_arrays_and_rle():
    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[0:2, 1:2] = True  # 2 px, both inside a
    assert M.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert M.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    # uncompressed RLE, column-major, starts with background: [1, 2, 3] on 2x3 ->
    # column 0 = [0, 1], column 1 = [1, 0], column 2 = [0, 0]
    rle = {"size": [2, 3], "counts": [1, 2, 3]}
    assert M.as_mask(rle).tolist() == [[False, True, False], [True, False, False]]
    # compressed: "053" -> runs [0, 5, 3]; "O" is a delta of -1 against the run two back (5) -> 4
    assert M.as_mask({"size": [2, 4], "counts": "053"}).sum() == 5
    assert M.as_mask({"size": [3, 4], "counts": "053O"}).ravel(order="F").tolist() == [True] * 5 + [False] * 3 + [True] * 4
    assert M.dice({"size": [2, 3], "counts": [1, 2, 3]}, np.array([[0, 1, 0], [0, 0, 0]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))


# --------------------------------------------------------------------------- classification


def test_accuracy_and_auroc():
    assert M.accuracy(["a", "b", "c"], ["a", "b", "b"]) == pytest.approx(2 / 3)
    # positive/negative pairs ranked right: (.9>.5, .9>.1, .4<.5, .4>.1) -> 3/4
    assert M.auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    # ties count 1/2: pos .8,.3,.9 vs neg .8,.1 -> (.5+1 + 0+1 + 1+1)/6
    assert M.auroc([1, 0, 1, 0, 1], [0.8, 0.8, 0.3, 0.1, 0.9]) == pytest.approx(4.5 / 6)
    assert M.auroc([1, 0], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError):
        M.auroc([1, 1], [0.1, 0.2])


def test_auroc_agrees_with_scikit_learn_when_installed():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)  # many ties
    assert M.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s))


def test_macro_auroc_one_vs_rest():
    gold = ["x", "y", "x", "z"]
    scores = [{"x": 0.9, "y": 0.1}, {"x": 0.2, "y": 0.8}, {"x": 0.6}, {"x": 0.7, "z": 0.3}]
    # x: pos .9,.6 vs neg .2,.7 -> (1+1+1+0)/4 = .75; y: pos .8 vs 0.1, 0, 0 -> 1; z: pos .3 vs 0,0,0 -> 1
    assert M.macro_auroc(gold, scores) == pytest.approx((0.75 + 1 + 1) / 3)
    assert M.macro_auroc(["x", "x"], [{"x": 1.0}, {"x": 0.5}]) is None


# --------------------------------------------------------------------------- text


def test_bleu4_closed_form():
    assert M.bleu4(["the cat sat on the mat"], ["The cat sat on the mat."]) == pytest.approx(1.0)
    # clipped precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert M.bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    # all n-grams match but hypothesis is 4 tokens vs 6: brevity penalty exp(1 - 6/4)
    assert M.bleu4(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.5))


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l("pneumonia", "no acute findings") == 0.0


def test_meteor_exact_match_known_value():
    # m = 4 matches, P = 1, R = 4/6, F = P*R / (0.9 P + 0.1 R); chunks "a b" + "c d" = 2
    p, r = 1.0, 4 / 6
    f = p * r / (0.9 * p + 0.1 * r)
    assert M.meteor_exact("a b c d", "a b x c d e") == pytest.approx(f * (1 - 0.5 * (2 / 4) ** 3))
    assert M.meteor_exact("x y", "a b") == 0.0


def test_meteor_exact_matches_nltk_without_stems_or_synonyms():
    from nltk.translate.meteor_score import single_meteor_score

    class NoSynonyms:
        def synsets(self, word):
            return []

    class Identity:
        def stem(self, word):
            return word

    pairs = [
        ("the cat sat on the mat", "on the mat the cat sat"),
        ("there is a small nodule in the left lung", "a small nodule is seen in the left upper lung"),
        ("normal chest x ray", "no acute cardiopulmonary abnormality"),
    ]
    for hyp, ref in pairs:
        want = single_meteor_score(M.tokenize(ref), M.tokenize(hyp), stemmer=Identity(), wordnet=NoSynonyms())
        assert M.meteor_exact(hyp, ref) == pytest.approx(want)


# --------------------------------------------------------------------------- retrieval / VQA


def test_recall_at_k():
    assert M.recall_at_k(["a", "b", "c", "d"], {"c", "e"}, 2) == 0.0
    assert M.recall_at_k(["a", "b", "c", "d"], {"c", "e"}, 3) == 0.5
    with pytest.raises(ValueError):
        M.recall_at_k(["a"], set(), 1)


def test_vqa_closed_and_open():
    assert M.closed_correct("Yes, there is a lesion.", "yes")
    assert not M.closed_correct("No.", "Yes")
    assert M.closed_correct("There is no fracture.", "no")
    assert not M.closed_correct("maybe", "no")
    for hedge in ("Not sure.", "It is not possible to determine from this image.", "I can't tell.", "Uncertain"):
        assert not M.closed_correct(hedge, "no") and not M.closed_correct(hedge, "yes"), hedge  # declined: wrong
    assert M.closed_correct("Not present.", "no") and M.closed_correct("None seen.", "no")
    for said, gold in (("No, a mass cannot be seen.", "no"), ("No, the lesion is not clear.", "no"),
                       ("Yes, there is an unclear margin.", "yes"), ("Yes, of unknown origin.", "yes")):
        assert M.closed_correct(said, gold), said  # an answer that opens with yes or no says so
    assert M.closed_correct("The left lung.", "left lung")
    assert not M.closed_correct("right", "left")
    assert M.token_f1("left lung", "the left lung") == 1.0
    assert M.token_f1("right lung", "left lung") == pytest.approx(0.5)
    assert M.token_f1("heart", "left lung") == 0.0


# --------------------------------------------------------------------------- tool use


def test_tool_selection_resolves_aliases(fake_grounding):
    g = ToolCall(API_name="grounding", API_params={"prompts": ["tumor"]})
    alias = ToolCall(API_name="Grounding DINO", API_params={"prompts": ["tumor"]})
    other = ToolCall(API_name="BiomedClip", API_params={})
    assert T.canonical_name("grounding dino") == "grounding"
    assert T.selection_correct([alias], [g])
    assert not T.selection_correct([alias, alias], [g])  # multiset: one extra call is wrong
    assert not T.selection_correct([other], [g])
    assert T.selection_correct([], [])
    assert not T.selection_correct([g], [])
    # an unregistered name compares case-insensitively
    assert T.selection_correct([ToolCall(API_name="XRay Magic")], [ToolCall(API_name="xray magic ")])
    assert T.canonical_name("XRay Magic") == "xray magic"
    assert T.call_counts([alias, alias, other], [g]) == (1, 3, 1)


def test_argument_validity_against_params(fake_grounding):
    ok = ToolCall(API_name="grounding dino", API_params={"image": "<imagepath>", "prompts": ["tumor"]})
    assert T.argument_error(ok) is None
    assert "prompts" in T.argument_error(ToolCall(API_name="grounding", API_params={"prompts": []}))
    assert "extra" in T.argument_error(ToolCall(API_name="grounding", API_params={"prompts": ["x"], "foo": 1})).lower()
    assert "unknown tool" in T.argument_error(ToolCall(API_name="nope", API_params={}))


def test_a_plugin_validator_that_raises_its_own_error_is_an_argument_error_not_a_crash():
    """A validator that assumes the type the model sends (``int`` has no ``lower``) raises past pydantic; the
    dispatcher refuses such a call, and scoring counted it by crashing."""
    from pydantic import field_validator

    from mmedagent.tools import Tool, ToolParams, ToolResult, register
    from mmedagent.tools.registry import refresh

    class P(ToolParams):
        organ: str | int

        @field_validator("organ")
        @classmethod
        def _lower(cls, v):
            return v.lower()

    class Organ(Tool):
        name = "organ_probe"
        description = "Probe an organ."
        Params = P
        Result = ToolResult

        def __call__(self, image, params):
            return ToolResult()

    register(Organ)
    try:
        error = T.argument_error(ToolCall(API_name="organ_probe", API_params={"organ": 3}))
        assert error == "invalid params for organ_probe: AttributeError: 'int' object has no attribute 'lower'"
        assert T.argument_error(ToolCall(API_name="organ_probe", API_params={"organ": "Liver"})) is None
    finally:
        refresh()


def test_argument_match(fake_grounding):
    def call(**params):
        return ToolCall(API_name="grounding", API_params={"image": "<imagepath>", **params})

    assert T.argument_match(call(prompts=["tumor"]), call(prompts=["Tumor"])) == 1.0
    # {left, kidney} vs {kidney}: P 1/2, R 1 -> F1 2/3
    assert T.argument_match(call(prompts=["left kidney"]), call(prompts=["kidney"])) == pytest.approx(2 / 3)
    assert T.argument_match(call(boxes=[[0, 0, 2, 2]]), call(boxes=[[1, 1, 3, 3]])) == pytest.approx(1 / 7)
    # a flipped predicted box scores 0 instead of crashing the report; the good one still counts
    assert T.argument_match(call(boxes=[[0.6, 0, 0, 0.4]]), call(boxes=[[0, 0, 0.6, 0.4]])) == 0.0
    assert T.argument_match(call(boxes=[[0.6, 0, 0, 0.4], [0, 0, 0.6, 0.4]]), call(boxes=[[0, 0, 0.6, 0.4]])) == 1.0
    # union of keys {prompts, k}: prompts match (1), k only on one side (0)
    assert T.argument_match(call(prompts=["a"], k=3), call(prompts=["a"])) == pytest.approx(0.5)
    pairs = T.paired_calls([call(prompts=["a"]), ToolCall(API_name="x")], [ToolCall(API_name="grounding dino")])
    assert len(pairs) == 1 and pairs[0][0].API_params["prompts"] == ["a"]


def test_scoring_takes_label_case_and_empty_masks_in_its_stride():
    """A tool label that differs from the gold only in case counts as correct (whatever the hash seed),
    and a segmentation output with an empty mask's ``[]`` box is scored, not a crash of the report."""
    from mmedagent.agent import AgentStep
    from mmedagent.evaluation.readers import EvalSample
    from mmedagent.evaluation.runner import SampleResult
    from mmedagent.evaluation.scoring import build_report
    from mmedagent.protocol import AssistantTurn, ToolOutcome

    gold_box = [0.1, 0.1, 0.5, 0.5]
    cls_sample = EvalSample(id="c", task="classification", source="record", question="What is it?",
                            reference={"label": "Chest X-ray"})
    seg_sample = EvalSample(id="s", task="segmentation", source="record", question="Segment it.",
                            reference={"boxes": [gold_box]})
    call = ToolCall(API_name="MedSAM", API_params={})
    seg_out = {"boxes": [[], gold_box], "areas": [0, 40]}
    results = [
        SampleResult(id="c", task="classification", answer="This is a chest x-ray.", steps=[AgentStep(
            index=0, raw="", outcomes=[ToolOutcome(tool="BiomedClip", output={
                "labels": ["chest X-ray", "brain MRI"], "probs": [0.9, 0.1]})])]),
        SampleResult(id="s", task="segmentation", answer="Segmented.", steps=[AgentStep(
            index=0, raw="", turn=AssistantTurn(thoughts="", actions=[call], value=""),
            outcomes=[ToolOutcome(tool="MedSAM", output=seg_out)])]),
    ]
    report = build_report([cls_sample, seg_sample], results, tool_mode="live")
    assert report["overall"]["classification_accuracy"] == 1.0
    assert report["overall"]["grounding_iou"] == 1.0


def test_a_turn_that_did_not_parse_is_no_answer_not_its_raw_text_read_as_one():
    """A reply cut off before its value: its raw text ("thoughts🤔 No tool is needed ...") was scored as the answer,
    a correct "no" to a closed question and a box where the thoughts quoted one."""
    from mmedagent.agent import AgentStep
    from mmedagent.evaluation.readers import EvalSample
    from mmedagent.evaluation.runner import SampleResult
    from mmedagent.evaluation.scoring import score_sample

    raw = '"thoughts🤔" No tool is needed for this question; the box [0.1, 0.1, 0.5, 0.5] shows it.\n"actions🚀" [{"API'
    sample = EvalSample(id="q", task="vqa_closed", source="record", question="Is there a mass?", answer_type="closed",
                        gold_answer="no", reference={"boxes": [[0.1, 0.1, 0.5, 0.5]]})
    cut = SampleResult(id="q", task="vqa_closed", answer=raw, stopped="length",
                       steps=[AgentStep(index=0, raw=raw, parse_error="the reply was cut off")])
    s = score_sample(sample, cut, [], "gold", 5)
    assert s["parse_error"] and s["vqa_closed"] is False and s["pred_boxes"] == [] and s["grounding_iou"] == 0.0
    answered = cut.model_copy(update={"answer": "No.", "steps": [AgentStep(index=0, raw="No.")]})
    assert score_sample(sample, answered, [], "gold", 5)["vqa_closed"] is True


def test_text_metrics_read_any_script():
    """Non-ASCII answers are words, not nothing: two different Chinese answers used to score token F1
    1.0 (both normalised to no tokens) and two identical ones ROUGE-L 0.0; accented words were split."""
    assert M.tokenize("Ménière’s disease, 0.5 cm") == ["ménière's", "disease", "0.5", "cm"]
    assert M.token_f1("是", "否") == 0.0 and not M.closed_correct("肝", "脾")
    assert M.token_f1("胸部 正常", "胸部") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert M.token_f1("Ménière disease", "ménière") == pytest.approx(2 / 3)
    assert M.rouge_l("胸部正常", "胸部正常") == 1.0
    # ROUGE-L counts the same tokens as the other text metrics: "0.5" is one token, as in BLEU and F1
    assert M.rouge_l("a 0.5 cm nodule", "a 0.7 cm nodule") == pytest.approx(3 / 4)


def test_token_recall_as_in_vqa_tables():
    # share of gold tokens in the prediction (articles dropped, multiset): "left lung" both found
    assert M.token_recall("The left lung, near the heart", "the left lung") == 1.0
    assert M.token_recall("left", "left lower lobe") == pytest.approx(1 / 3)
    assert M.token_recall("lung lung", "lung lung lung") == pytest.approx(2 / 3)
    assert M.token_recall("", "liver") == 0.0


def test_argument_match_pairs_calls_made_in_another_order(fake_grounding):
    """Two calls to one tool made in the other order than the gold's are each paired with their own gold
    call (they used to be paired by position, and both scored 0)."""
    tumor = ToolCall(API_name="grounding", API_params={"prompts": ["tumor"]})
    kidney = ToolCall(API_name="grounding dino", API_params={"prompts": ["left kidney"]})
    pairs = T.paired_calls([kidney, tumor], [tumor, kidney])
    assert [(p, T.argument_match(p, g)) for p, g in pairs] == [(kidney, 1.0), (tumor, 1.0)]
    # the closest gold call is taken first, whatever the order; the extra prediction is unpaired
    near = ToolCall(API_name="grounding", API_params={"prompts": ["tumor", "mass"]})
    assert T.paired_calls([near, tumor], [tumor]) == [(tumor, tumor)]


def test_a_label_is_the_one_the_answer_names_first():
    """An answer that ranks the tool's labels is scored by its first label, not by its longest (it was
    read as 'hematoxylin and eosin histopathology'); a label inside a longer one does not count."""
    from mmedagent.evaluation.scoring import label_in_answer

    labels = ["brain MRI", "abdomen CT", "hematoxylin and eosin histopathology", "CT", "lung CT"]
    answer = "Most likely brain MRI (0.86); abdomen CT or hematoxylin and eosin histopathology are less likely."
    assert label_in_answer(answer, labels) == "brain MRI"
    assert label_in_answer("This is a lung CT.", labels) == "lung CT"
    assert label_in_answer("A CT of the lung.", labels) == "CT"
    assert label_in_answer("I cannot tell.", labels) is None


def test_judge_grades_are_read_only_where_the_reply_gives_one():
    from mmedagent.evaluation.judge import parse_score

    replies = ("8", "**8**", "Score: 7/10", "I would rate it 6 out of 10.", "10", "8.5", "Rating - 9")
    assert [parse_score(r) for r in replies] == [8.0, 8.0, 7.0, 6.0, 10.0, 8.5, 9.0]
    # the first digit anywhere is no grade: the 1 of the scale, a coordinate of a quoted box, 2 of 12/10
    for reply in ("On a scale of 1 to 10 this", "The tumor is at [0.41, 0.5", "12/10", "0", "Good answer."):
        assert parse_score(reply) is None, reply


def test_tied_detections_on_one_image_are_matched_as_many_as_can_be_whatever_their_order():
    """A overlaps both gold boxes, B only the first: greedy matching in data order gave A the first box
    when A came first (then B missed: AP 0.25), both hits when B came first (AP 1.0)."""
    from mmedagent.evaluation.metrics import average_precision

    g1, g2 = (0, 0, 10, 10), (2, 0, 12, 10)
    a, b = (0.5, 0, 10.5, 10), (-3, 0, 9, 10)
    gold = {"img": [g1, g2]}
    assert average_precision([("img", 1.0, a), ("img", 1.0, b)], gold) == 1.0
    assert average_precision([("img", 1.0, b), ("img", 1.0, a)], gold) == 1.0
    # a higher score still comes first: A at 0.9 takes g1 (its best), and B at 0.8 then misses
    assert average_precision([("img", 0.8, b), ("img", 0.9, a)], gold) == 0.5


def test_a_long_chain_of_competing_tied_boxes_needs_no_recursion():
    """Each tied detection overlaps its gold box and the next one: the augmenting path is as long as the
    chain (a recursive search hit Python's recursion limit at about 1,000 boxes)."""
    import sys

    from mmedagent.evaluation.metrics import average_precision

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(150)
    try:
        n = 300
        gold = {"img": [(k, 0, k + 3, 1) for k in range(n)]}
        dets = [("img", 1.0, (k + 0.6, 0, k + 3.6, 1)) for k in range(n)]
        assert average_precision(dets, gold) == 1.0
    finally:
        sys.setrecursionlimit(limit)


def test_gold_boxes_of_equal_iou_are_taken_by_their_coordinates_not_their_order():
    from mmedagent.evaluation.metrics import average_precision

    g0, g1 = (0, 0, 10, 10), (2, 0, 12, 10)
    a, b = (1, 0, 11, 10), (-2, 0, 8, 10)  # a overlaps both equally; b (lower score) only g0 well
    dets = [("i", 1.0, a), ("i", 0.5, b)]
    assert average_precision(dets, {"i": [g0, g1]}) == average_precision(dets, {"i": [g1, g0]})
