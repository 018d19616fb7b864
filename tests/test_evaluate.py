"""Evaluation tasks: prompt rendering, answer extraction, letter scoring, the runner and its cache."""
import json
import os
import time
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import nanopost
from nanopost import tasks
from nanopost.data import DataError
from nanopost.engine import Engine, Sampling, cut_at_stop
from nanopost.tasks import choice, gsm8k
from nanopost.testing import make_tiny_checkpoint, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("NANOPOST_DATA", os.path.join(ROOT, "..", "shared", "benchmarks"))  # evaluate.py --download
sys.path.insert(0, ROOT)  # evaluate.py's helpers
from evaluate import letter_logprobs, subset  # noqa: E402  (evaluate.py at the repo root)


# A crafted HumanEval task (prompt, tests, check) and two completions of it.
ADD = {"id": "add/0", "prompt": 'def add(a, b):\n    """a + b"""\n', "entry_point": "add", "answer": "pass",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
WRONG, RIGHT = "def add(a, b):\n    return a - b\n", "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def shared():
    """The paper's benchmark files ($NANOPOST_DATA, else the developers' ../shared/benchmarks), or skip."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"benchmark files not found at {SHARED} (evaluate.py --download --data-dir DIR, then NANOPOST_DATA=DIR)")
    return SHARED


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A miniature benchmark tree in the real layouts (a few rows of each), so tests need no download."""
    d = tmp_path_factory.mktemp("bench")
    (d / "gsm8k").mkdir()
    rows = [{"question": f"Tom has {n} apples and buys {n + 1} more. How many apples?",
             "answer": f"He has {n}+{n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1} apples.\n#### {2 * n + 1}"} for n in range(1, 9)]
    for f in ("train.jsonl", "test.jsonl"):
        (d / "gsm8k" / f).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, split, header, suffix in (("mmlu", "test", None, "_test"), ("cmmlu", "test", ",Question,A,B,C,D,Answer", ""),
                                        ("ceval", "val", "id,question,A,B,C,D,answer", "_val")):
        (d / task / split).mkdir(parents=True)
        (d / task / "dev").mkdir()
        body = "".join(f'{i},"问题 {i}, with a comma",甲{i},乙,丙,丁,{"ABCD"[i % 4]}\n' for i in range(5))
        text = (header + "\n" + body) if header else "".join(line.split(",", 1)[1] for line in body.splitlines(True))
        for sub in ("algebra", "law"):
            (d / task / split / f"{sub}{suffix}.csv").write_text(text, encoding="utf-8")
            (d / task / "dev" / f"{sub}{'_dev' if suffix else ''}.csv").write_text(text, encoding="utf-8")
        (d / task / "mapping.json").write_text(json.dumps({"algebra": {"name": "代数", "category": "STEM"},
                                                           "law": {"name": "law", "category": "Humanities"}}))
    (d / "humaneval").mkdir()
    row = {"task_id": ADD["id"], "canonical_solution": "    return a + b\n",
           **{k: ADD[k] for k in ("prompt", "test", "entry_point")}}
    (d / "humaneval" / "HumanEval.jsonl").write_text(json.dumps(row) + "\n")
    return str(d)


def test_gsm8k_extraction_and_gold():
    assert gsm8k.gold("blah\n#### 1,234") == "1234"
    assert gsm8k.extract("So she pays $1,250.50 in total. The answer is 1,250.5.") == "1250.5"
    assert gsm8k.extract("The temperature fell to -7 degrees, so the answer is -7") == "-7"
    assert gsm8k.extract("3 apples + 4 apples = 7.0") == "7"
    assert gsm8k.extract("no number here") is None
    assert gsm8k.extract("It takes between 5-6 hours, so 6") == "6"  # a dash, not a minus
    assert gsm8k.extract("The temperature drops to \u22123 degrees.") == "-3"  # the Unicode minus
    assert gsm8k.extract("Count them: 1,2,3") == "3"  # a list, not the number 123
    assert gsm8k.extract("The answer is 18. (\U0001d7cf)") == "18" and gsm8k.extract("１８") is None  # ASCII digits
    assert gsm8k.extract("He earns 12,345 dollars and 1,000,000 later") == "1000000"
    assert gsm8k.extract("He spends 2-3=-1 hours") == "-1"
    assert gsm8k.extract("Each costs .5 dollars, so the answer is .5") == "0.5"
    assert gsm8k.extract("Agent 007 needs 007 minutes") == "7" and gsm8k.gold("#### 0") == gsm8k.extract("-0.0")
    assert gsm8k.extract("The answer is .0") == "0" == gsm8k.extract("-.00") and gsm8k.extract("So .50") == "0.5"
    ex = {"answer": "72"}
    assert gsm8k.score(ex, "48 + 24 = 72. The answer is 72.") == ("72", True)
    # commas group thousands only (else a list); a dash after "3." is no minus; a sign before "$" is one
    assert gsm8k.extract("Monthly totals: 1500,250") == "250" and gsm8k.extract("The numbers were 7,1000") == "1000"
    assert gsm8k.extract("They met on days 3.-5.") == "5" and gsm8k.extract("Her balance ends at -$5") == "-5"
    assert gsm8k.gold("#### 1.0.") == "1" and gsm8k.gold("First #### 5 then #### 7") == "7"  # lm-eval: the last ####


def test_a_gsm8k_gold_that_is_not_one_number_is_refused(tmp_path):
    """A gold answer "5 apples" can never equal an extracted number: the question would count as
    wrong for every model, so the file is refused naming the line."""
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "so #### 5 apples"}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: the answer has no final '#### N' line with a number"):
        gsm8k.read_rows(str(f))


def test_gsm8k_prompt_is_the_papers(data_dir):
    examples, _, mode = tasks.load("gsm8k", data_dir)
    text = examples[0]["messages"][0]["content"]
    assert mode == "generate" and len(examples[0]["messages"]) == 1
    assert text.count("Question: ") == 5 and text.count("The answer is ") == 4  # 4 exemplars + the question
    assert "<<" not in text and text.endswith("How many apples?\nLet's think step by step")
    # each exemplar, and the question after them, follows a blank line; an exemplar ends "The answer is N."
    assert text.count(".\n\nQuestion: ") == 4 and not text.startswith("\n")
    assert examples[0]["answer"] == "3"
    zero = tasks.load("gsm8k", data_dir, shots=0)[0][0]["messages"][0]["content"]
    assert zero == "Question: Tom has 1 apples and buys 2 more. How many apples?\nLet's think step by step"
    # generation stops where the reply starts the next exemplar-style question, whose numbers would count
    reply = "1 + 2 = 3 apples. The answer is 3.\n\nQuestion: Tom has 4 apples and buys 5 more."
    assert gsm8k.score(examples[0], cut_at_stop(reply, examples[0]["stop"])) == ("3", True)


@pytest.mark.parametrize("reply, letter", [
    # English
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("Answer: D", "D"),
    ("The answer is: C", "C"),
    ("A careful reading of the passage shows the answer is: C", "C"),
    ("A good choice is C, because the other options ignore friction.", "C"),
    ("I think the answer is not A, it is B", "B"),
    ("答案不是A，是B", "B"),
    ("I am not sure. A, B, C could be right, but D is the answer.", "D"),
    ("A. Paris is the capital of France.", "A"),
    ("**B**", "B"),
    ("The correct answer is **D. 42**", "D"),
    ("Option A is wrong since it ignores inflation. B is correct.", "B"),
    ("Let's look at each option. A describes mitosis, not meiosis. Therefore, the answer is B.", "B"),
    ("I think the answer is a matter of interpretation.", None),
    ("Vitamin deficiency is the cause; the best choice would be (A).", "A"),
    ("The final answer is $\\boxed{C}$", "C"),
    ("A is the correct answer because water boils at 100 °C.", "A"),
    ("(C) 1776", "C"),
    ("None of the options is fully satisfying.", None),
    ("Looking at A and B, neither holds, so the correct option is C.", "C"),
    ("The correct option is A because the others contradict the premise. B is wrong.", "A"),
    ("The best option: A, since B and C fail.", "A"),
    ("The correct option is A since the rest fail.", "A"),
    ("The correct option is A rather than C.", "A"),
    ("The final letter is A whereas B is a distractor.", "A"),
    ("The correct option is A based on the data; D is wrong.", "A"),
    ("The correct option is A in this case.", "A"),
    ("The best option is: A decrease in aggregate demand, so the final letter is C.", "C"),
    ("So the correct option is A sharp rise in unemployment (option D).", "D"),
    ("The best option would be A lot more expensive than C, so C.", "C"),
    ("A and B are both wrong. The best option here is (D).", "D"),
    ("Option A is wrong: B contradicts it. The right option: C", "C"),
    # an option discussed, ruled out or hedged on is not the answer
    ("Answer choice A is incorrect because it ignores friction. Answer choice C is correct.", "C"),
    ("Choice A is wrong. Choice C is right.", "C"),
    ("The answer isn't A; it is C.", "C"),
    ("A or B", None),
    ("It is either A or B", None),
    ("The answer is A or B.", None),
    ("A or B? Neither: D.", "D"),
    ("(A) or (B)", None),
    ("The answer is **A** or **B**.", None),
    ("A or B is correct.", None),
    ("It is [C] or [D]; I cannot tell. Answer: (A) or (B)", None),
    ("(A) or (B)? Neither. The answer is (C).", "C"),
    ("The answer is not (A), it is (B)", "B"),
    ("The answer is not **A**, it is **B**", "B"),
    ("The answer isn't (A); it is (C).", "C"),
    ("Not A. It is B.", "B"),
    ("A, B or C", None),
    ("The answer is A, B, C or D.", None),
    ("(A), (B) or (C)", None),
    ("A/B", None),
    ("A/B? No: the answer is C.", "C"),
    # a base model carrying on the few-shot prompt: the answer to the question asked, not its own question's
    ("B\n\nWhich of the following is a prime number?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C", "B"),
    ("Let's check each:\nA. 4 is even\nB. 6 is even\nC. 7 is prime\nD. 9 is 3x3\nAnswer: C", "C"),
    ("Reasoning first.\n\nA. 4 no\nB. 6 no\nC. 7 yes\nD. 9 no\nAnswer: C", "C"),
    ("The answer is B.\n\nWhich is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C", "B"),
    # ... but options restated after a blank line are the reply's own, whatever letter stands before them
    ("Vitamin D is fat-soluble.\n\nLet's review the options:\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\n"
     "D. Vitamin B12\nAnswer: C", "C"),
    ("Plan B is the fallback.\n\nOptions restated:\nA. x\nB. y\nC. z\nD. w\nAnswer: A", "A"),
    ("Options A and C can be eliminated right away.\n\nRemaining:\nA. x\nB. y\nC. z\nD. w\nAnswer: D", "D"),
    ("Options A, B, and C are incorrect. Therefore D.", "D"),
    ("The answer can't be B, so it must be A.", "A"),
    ("The answer cannot be B, so it is A.", "A"),
    ("I would not choose A. B seems right.", "B"),
    ("The answer is A, B, or C.", None),
    ("A OR B", None),
    ("The answer is A/B testing.", "A"),  # a term, not a hedge
    ("The answer is A/D conversion.", "A"),
    ("(A) and (B) are wrong, so (C).", "C"),
    ("B, or possibly C", None),
    ("B or maybe C", None),
    ("The answer is B, or probably C.", None),
    ("B, but C is wrong.", "B"),
    # ... but a maybe beside an answer is no hedge
    ("Answer: B\nPerhaps D looks plausible, but it ignores friction.", "B"),
    ("The answer is B\nMaybe A if we ignore air resistance, but the question does not.", "B"),
    ("答案：B\n可能C看起来也对，但它忽略了摩擦。", "B"),
    ("Not A, probably B.", "B"),
    ("Definitely not C, probably D.", "D"),
    ("不是A，可能B。", "B"),
    ("A and B are wrong, not D, maybe C.", "C"),
    # options restated in the reply are not its answer (the last resort took their first label)
    ("Let me restate: A. 1, B. 2, C. 3, D. 4. So B.", "B"),
    ("The options are:\nA. 1\nB. 2\nC. 3\nD. 4\nThe correct one is B.", "B"),
    ("The options are:\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\nD. Vitamin B12\nThe one to pick: C", "C"),
    ("Options: (A) cat (B) dog (C) cow (D) pig. I pick (B).", "B"),
    ("A. 1\nB. 2\nC. 3\nD. 4\n\nB", "B"),
    ("A) 5 B) 6 C) 7 D) 8 -> D", "D"),
    ("B. 6", "B"),
    # a reply that only echoes the options answers nothing (A was taken) -- nor, as it looks the same, one
    # that answers "A. Paris" and then explains B, C and D in turn
    ("A. 12\nB. 15\nC. 18\nD. 21", None),
    ("Options: A. mitosis, B. meiosis, C. fission, D. budding. Hard to say.", None),
    ("A) red\nB) blue\nC) green\nD) yellow", None),
    ("A. Paris\n\nB. London is the capital of the UK.\nC. Berlin is the capital of Germany.\nD. Madrid is the "
     "capital of Spain.", None),
    # an option judged right in an analysis of each
    ("A．北京\nB．上海是经济中心，C．广州，D．深圳均不是首都。答案：A", "A"),
    ("分析各选项：\nA. 正确，符合题意。\nB. 错误。\nC. 错误。\nD. 错误。", "A"),
    ("A. 1\nB. 2\nC. 3\nD. 4\nSo D.", "D"),
    ("Restated: A. 1, B. 2, C. 3, D. 4. It is C.", "C"),
    # restated options after a reply that says more than its letter: its own "Answer:" line decides
    ("B is the right answer at first glance, but let's check.\n\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C", "C"),
    ("D-day was in 1944.\n\nA. 1942\nB. 1943\nC. 1944\nD. 1945\nAnswer: C", "C"),
    ("(B) cells divide by mitosis.\n\nA. x\nB. y\nC. z\nD. w\nAnswer: D", "D"),
    (" B. 6\n\nWhich is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C", "B"),
    ("Answer: B\n\nWhich is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C", "B"),
    ("Both A and B are wrong, C.", "C"),
    ("Options A and C are wrong; D.", "D"),
    ("A is not right here. (B)", "B"),
    ("My answer choice: B", "B"),
    ("Considering A. Answer B", "B"),
    # ... but one letter said to be false may answer "Which statement is false?"
    ("C is false.", "C"),
    ("B is incorrect, which is what the question asks for.", "B"),
    ("D is not true of mitochondria.", "D"),
    # Chinese
    ("答案是：B", "B"),
    ("根据题意，A项说法错误。答案是：B", "B"),
    ("答案：C", "C"),
    ("正确答案是D，因为……", "D"),
    ("A选项错误，C是正确的。", "C"),
    ("选项A与题干不符，故选B。", "B"),
    ("答案为（D）", "D"),
    ("分析：A、B两项均不符合题意，所以答案应该是C。", "C"),
    ("我认为答案是选项A。", "A"),
    ("本题选C", "C"),
    ("正确的选项是C", "C"),
    ("A项和B项都不对，正确选项为D", "D"),
    # ... but "option" without a verb or colon before the letter names an option under discussion
    ("Let's go through each option to find the correct option:\nA. 1776 - signed, not ratified.\nB. 1789.\nSo B is correct.", "B"),
    ("Is the correct option A? No. B is correct.", "B"),
    ("The final option D is a distractor. C is correct.", "C"),
    ("Checking the best option A: not it. Option B is correct.", "B"),
    ("分析每个选项，找出正确选项：\nA. 错误\nB. 错误\nC. 正确\n故选C", "C"),
    ("正确选项是A吗？不是，故选B", "B"),
    ("答案是A或B", None),
    ("答案是A或者B", None),
    ("答案是（A）或（B）", None),
    ("答案不是（A），是（B）", "B"),
    ("A、B或C", None),
    ("**解析**：A项，错误。B项，正确。\n\n**答案**：B", "B"),
    ("A项错误。**答案：** C", "C"),
    ("正确答案是A/B测试。", "A"),
    ("A、B都错误，C", "C"),
    # a question is not an answer, nor the first of options listed under "the answer:", nor a wrong answer,
    # nor letters ruled out by neither/nor, nor several letters named correct together
    ("Is the answer A? No. The correct option is B.", "B"),
    ("Is the answer A? No. B is correct.", "B"),
    ("Is the answer B? No, it's D.", "D"),
    ("To find the answer:\nA. 1 is wrong\nB. 2 is right\nSo the correct option is B.", "B"),
    ("The correct answer is neither A nor B; it is D.", "D"),
    ("Neither A nor B is right; D is correct.", "D"),
    ("The wrong answer is B; D is correct.", "D"),
    ("A common wrong answer is C, but the correct option is B.", "B"),
    ("Both A and C are correct.", None),
    ("C and D are both correct.", None),
    ("Answer: A, B, C, D", None),
    ("The answer is B, C is wrong.", "B"),
    ("**Answer:**\nB. Paris", "B"),
    ("Answer:\nC", "C"),
    ("The wrong answer is B.", None),
    ("The wrong choice is A.", None),
    ("答案是A吗？", None),
    ("Answer: C and D", None),
    ("答案是B、C", None),
    ("C、D都正确", None),
    # ... but an answer followed by the letters it rules out is that answer
    ("The answer is B, and C and D are incorrect.", "B"),
    ("The correct answer is B, and C, D are incorrect.", "B"),
    ("The right answer is A, and B and C are close but wrong.", "A"),
    ("The answer is B, C and D seem wrong.", "B"),
    ("Clearly the answer is D, A being irrelevant.", "D"),
    ("答案是B，A和C都错误。", "B"),
    ("选B，A、C、D都不对。", "B"),
    ("答案为D，A、B、C三项均错误。", "D"),
    ("正确答案是A，B、C、D均不符合。", "A"),
    ("该题选C，A和B都不符合题意。", "C"),
    ("Options A and B\nThe answer is C", "C"),
    ("A and C both are correct.", None),
    ("Both A and C are valid answers.", None),
    ("The answers are A and C because both hold.", None),
    ("The answer is A and C, since both apply.", None),
    ("Answer: A and C (both apply)", None),
    ("A、B正确。", None),
    ("B、D正确，A、C错误。", None),
    ("A和C都正确。", None),
    ("答案是B和C。", None),
    ("正确的选项是A和C。", None),
    ("I choose B, A and C are wrong.", "B"),
    ("I choose D, A和B都不对.", "D"),
    ("The answer is C, A or B are wrong.", "C"),
    ("答案是C，A或B都不对。", "C"),
    ("A or B are wrong, so C.", "C"),
    ("A、C错误，选B", "B"),
    ("A错误。", "A"),  # one letter said wrong may answer "Which is false?"
    ("错误答案是B", None),
    ("错误的选项是C，正确的选项是A", "A"),
    ("不正确的选项是A", None),
    # letters joined to a word by a hyphen or digits are not options ("of B-cell origin" took B)
    ("The cells are of B-cell origin.\n\nThe most likely diagnosis is:\n\n**C. chronic lymphocytic leukemia**", "C"),
    ("It lacks vitamin B12, so C.", "C"),
    ("3D printing: C", "C"),
    ("anti-B antibodies: C", "C"),
    ("One of options A-D: B", "B"),
    # (each case below once passed under a changed rule: a mutation-testing review)
    ("答案选D。\n分析：A. 正确，符合史实。B. 正确。C. 正确。D. 错误，与史实不符。", "D"),
    ("The bad answer is option B; the correct answer is C.", "C"),
    ("The answers are A and C, as explained above.", None),
    ("Not A. Looking at the options again: A. 12 B. 15 C. 18 D. 21", None),
    ("The incorrect answer would be (B).", None),
    ("B. The mitochondria is the organelle that produces energy\n\nWhich of the following is a prime number?\n"
     "A. 4\nB. 6\nC. 7\nD. 9\nAnswer: C", "B"),  # read up to the model's own next question
    ("A与C都正确。", None),
    ("B seems plausible at first, but the correct answer is:\nD", "D"),
    ("A看似合理，但正确选项：C", "C"),
    ("答案：C和D对比，前者更合适。", "C"),  # 对比 is "compare", not "correct"
])
def test_choice_extraction(reply, letter):
    """Replies in the forms models write, English and Chinese (after OpenCompass' and lm-eval's
    extraction conventions): the article "A", an earlier option under discussion, lower-case "a"."""
    assert choice.extract(reply) == letter


def test_two_labels_of_a_cut_off_list_are_a_restated_list():
    assert choice.extract("The statements:\nA. 1 is prime, which is false.\nB. 2 is", cut=True) is None


def test_a_reply_cut_off_while_listing_options_has_not_answered(tmp_path, data_dir, tiny, monkeypatch):
    """A reply that hit its token limit while it listed the options ("each option:\n\nA. Live virus",
    the end) gave no answer; scored correct before when the answer was A. The same text, complete, answers A;
    an answer given before the cut is still read."""
    listing = "To determine the correct answer, let's analyze each option:\n\nA. Live virus"
    assert choice.extract(listing, cut=True) is None and choice.extract(listing) == "A"
    assert choice.extract("Let's check each.\nA. 1 is wrong.\nB. 2 is", cut=True) is None
    assert choice.extract("The answer is B.\n\nA. 1 is wrong.\nB. 2 is", cut=True) == "B"
    assert choice.extract("A. Paris\n\nParis has been the capital since", cut=True) == "A"
    for reply in ("Let's analyze each option:\n\nA. Live vaccine\n   - Contains a weakened virus.\n   - Can",
                  "Let's analyze each option:\n\nA. Live virus vaccine\n", "Consider each:\n**A. Live virus**",
                  "Let's analyze each option:\n\n- A. Live virus vaccine: no\n- B. Inactivated vaccine: safe because",
                  "Let's analyze each option:\n\n1. A. Live virus vaccine: no\n2. B. Inactivated vaccine: safe",
                  "Let's analyze each option:\n\nA. Live virus vaccine\n   - Unlike (B), it contains a live",
                  "Let's analyze each option.\n\nA. Live virus vaccine", "我们逐一分析各个选项。\n\nA. 活疫苗"):
        assert choice.extract(reply, cut=True) is None, reply
    for reply in ("Therefore, A. Live virus vaccines should be avoided since they",  # an answer, not a list
                  "A. Live virus vaccines. They are contraindicated because the attenuated virus can",
                  "(A) Live virus vaccines, because", "The answer is:\n-A. Live virus vaccines because",
                  "The correct option is:\n\nA. Live virus vaccine\n\nLive vaccines contain a weakened virus that",
                  "正确选项是：\n\nA. 活疫苗\n\n解析：活疫苗含有减毒的病毒，可能", "**Correct option:**\n\n**A. Live virus**\n\nIt"):
        assert choice.extract(reply, cut=True) == "A", reply
    # a question of its own in the exemplars' form, then an answer: read the same whatever the cut
    restating = "1 + 1 = ?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: let's compute: 1 + 1 = 2.\nSo it is\nA. 2"
    assert choice.extract(restating) == "A"
    assert choice.extract("1 + 1 = ?\n\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: Let's analyze each option:\n\nA. 2", cut=True) is None
    seen = {}  # evaluate.py tells the scorer which replies hit the limit
    scorer = choice.score
    monkeypatch.setattr(choice, "score", lambda ex, reply, cut=False: seen.update({ex["id"]: cut}) or scorer(ex, reply, cut))
    code, err, res = evaluate("--model", tiny, "--tasks", "mmlu", "--mode", "generate", "--data-dir", data_dir,
                              "--limit", 3, "--max-new-tokens", "mmlu=4", "--out", tmp_path / "eval")
    assert code == 0, err
    assert seen == {p["id"]: p["hit_limit"] for p in res[tiny]["mmlu"]["predictions"]} and any(seen.values())


def test_choice_extraction_of_degenerate_replies_finishes():
    """A model stuck repeating '*', spaces or "A, " fills a reply with thousands of them: neighbouring
    quantifiers over the same characters took 13 s on "Answer" + 1994 '*' (26 s on 答案 + spaces).
    Generous bound: this guards against polynomial backtracking, it is not a speed goal."""
    replies = ["Answer" + "*" * 1994, "答案" + "*" * 1998, "答案" + " " * 1998, "answer" + " " * 1994, "A" + " " * 1996,
               "A" + "*" * 1998 + "B", ("A, " * 666)[:1997] + " or", ("A，" * 1000)[:1999] + "或", "A" + " " * 1996 + " or",
               "\n" * 2000, "A or " * 400, "correct option" + " " * 1990, "正确选项是" + " " * 1995, "B" + " " * 1999 + "x",
               " " * 2000 + "\n\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B", "B." + "x " * 1000 + "\n\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C"]
    replies += ["1" * 1998 + "A.", "A. x\n" * 400, "- A. " * 400, "\nB. 1" * 400]  # and as cut-off lists
    t = time.time()
    for r in replies:
        choice.extract(r)
        choice.extract(r, cut=True)
    assert time.time() - t < 5


@pytest.mark.parametrize("task", ["mmlu", "cmmlu", "ceval"])
def test_choice_prompts_in_each_layout(data_dir, task):
    examples, _, mode = tasks.load(task, data_dir, shots=2)
    assert mode == "choice" and len(examples) == 10
    ex = examples[1]
    assert ex["answer"] == "B" and ex["category"] == "STEM" and ex["subject"] == "algebra"
    text = ex["messages"][0]["content"]
    assert "问题 1, with a comma\nA. 甲1\nB. 乙\nC. 丙\nD. 丁\n" in text  # quoted commas and Chinese text survive
    assert text.count(choice.ANSWER[task]) == 3 and text.endswith(choice.ANSWER[task])
    # each benchmark's own layout (Hendrycks' MMLU code, CMMLU's mp_utils.format_example, C-Eval's evaluators)
    question, shot = {"mmlu": ("", "\nAnswer: B\n\n"), "cmmlu": ("题目：", "\n答案是：B\n\n"),
                      "ceval": ("", "\n答案：B\n\n")}[task]
    assert f"{question}问题 1, with a comma\nA. 甲1\nB. 乙\nC. 丙\nD. 丁{shot}{question}问题 1, with" in text
    assert text.endswith(f"{question}问题 1, with a comma\nA. 甲1\nB. 乙\nC. 丙\nD. 丁\n{choice.ANSWER[task]}")
    assert ("代数" in text) and text.startswith(choice.HEAD[task].format(name="代数"))


def test_cmmlu_and_ceval_average_over_subjects_mmlu_over_questions():
    """CMMLU's get_results and C-Eval's leaderboard average the subjects' accuracies (overall and per
    category); Hendrycks' MMLU code pools every question. 3 of 4 right in one subject, 0 of 1 in another."""
    from evaluate import summarize
    preds = [{"subject": "a", "category": "STEM", "correct": c} for c in (True, True, True, False)]
    preds += [{"subject": "b", "category": "STEM", "correct": False}, {"subject": "c", "category": "Other", "correct": True}]
    pooled, means = summarize(preds), summarize(preds, over_subjects=True)
    assert pooled["accuracy"] == 66.67 and pooled["by_category"] == {"Other": 100.0, "STEM": 60.0}
    assert means["accuracy"] == round((75 + 0 + 100) / 3, 2) and means["by_category"] == {"Other": 100.0, "STEM": 37.5}
    assert means["by_subject"] == pooled["by_subject"] == {"a": 75.0, "b": 0.0, "c": 100.0} and means["n"] == 6
    assert choice.OVER_SUBJECTS == {"cmmlu", "ceval"}
    # CMMLU's scripts also report "China specific", over 15 subjects that each have another category too
    preds[-1]["also"] = ["China specific"]
    assert summarize(preds, over_subjects=True)["by_category"] == {"China specific": 100.0, "Other": 100.0, "STEM": 37.5}
    assert len(choice.ALSO["cmmlu"]["China specific"]) == 15


def test_cmmlu_questions_carry_their_second_category(tmp_path):
    for subject in ("chinese_history", "anatomy"):
        (tmp_path / "cmmlu" / "test").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cmmlu" / "test" / f"{subject}.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n")
    got = {e["subject"]: (e["category"], e.get("also")) for e in choice.load("cmmlu", str(tmp_path))}
    assert got == {"chinese_history": ("Humanities", ["China specific"]), "anatomy": ("STEM", None)}


def test_out_inside_a_checkpoint_folder_is_refused(tmp_path, tiny, data_dir):
    """results.json beside config.json would join the files the checkpoint's stamp hashes: every
    later run found the model 'changed since', dropped its numbers and recomputed its cache."""
    model = str(tmp_path / "model")
    shutil.copytree(tiny, model)
    before = sorted(os.listdir(model))
    r = run_eval("--model", model, "--tasks", "mmlu", "--data-dir", data_dir, "--limit", 2, "--out", model)
    assert r.returncode == 2 and "is a checkpoint folder" in r.stderr and sorted(os.listdir(model)) == before
    r = run_eval("--model", model, "--tasks", "mmlu", "--data-dir", data_dir, "--limit", 2, "--dtype", "float32",
                 "--out", os.path.join(model, "eval"))  # a folder inside it is not stamped: fine
    assert r.returncode == 0 and os.path.exists(os.path.join(model, "eval", "results.json")), r.stderr


def test_letter_scoring_equals_full_forward(tiny):
    model, tok = nanopost.load(tiny)
    letters = [tok.encode(L)[0] for L in "ABCD"]
    prompts = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("Pick one.\nA. x\nB. y\nC. z\nD. w\nAnswer:", "Short?", "A longer question " * 5)]
    got = letter_logprobs(Engine(model, tok), prompts, letters)
    with torch.no_grad():
        for p, lp in zip(prompts, got):
            ref = model(torch.tensor([p]))[0, -1].double().log_softmax(-1)[letters]
            assert torch.allclose(torch.tensor(lp, dtype=torch.float64), ref, atol=1e-4)
            assert max(range(4), key=lambda j: lp[j]) == int(ref.argmax())


def run_eval(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_runner_writes_results_and_resumes_from_its_cache(tmp_path, tiny, data_dir):
    out = tmp_path / "eval"
    args = ["--model", tiny, "--tasks", "gsm8k,mmlu,ceval", "--data-dir", data_dir, "--limit", 6,
            "--max-new-tokens", 6, "--batch-size", 4, "--dtype", "float32", "--out", out]
    r = run_eval(*args)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "results.json"))
    for task in ("gsm8k", "mmlu", "ceval"):
        t = res[tiny][task]
        assert t["n"] == 6 and len(t["predictions"]) == 6
        if task == "ceval":  # the mean of its subjects' accuracies, as C-Eval's scripts report it
            by = t["by_subject"]
            assert t["accuracy"] == pytest.approx(sum(by.values()) / len(by), abs=0.01)
        else:  # the share of all questions (MMLU: Hendrycks' pooled accuracy)
            assert t["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in t["predictions"]) / 6, abs=0.01)
    assert set(res[tiny]["mmlu"]["by_category"]) == {"STEM", "Humanities"}
    md = open(out / "results.md").read()
    assert "| model | gsm8k | mmlu | ceval |" in md
    # the greedy GSM8K replies are the engine's
    model, tok = nanopost.load(tiny)
    ex = [e for e in tasks.load("gsm8k", data_dir)[0] if e["id"] == res[tiny]["gsm8k"]["predictions"][0]["id"]][0]
    reply = Engine(model, tok).generate([ex["messages"]], Sampling(max_new_tokens=6))[0]
    assert res[tiny]["gsm8k"]["predictions"][0]["reply"] == reply
    # resume: cached predictions are not recomputed; a line cut by a crash is redone
    caches = sorted((out / "cache").iterdir())
    sizes = [len(open(c).readlines()) for c in caches]
    with open(caches[0], "a") as f:
        f.write('{"id": 0, "cut off')
    lines = open(caches[0]).readlines()
    open(caches[0], "w").writelines(lines[:3] + [lines[-1]])  # lose the rest, keep a broken tail
    r = run_eval(*args)
    assert r.returncode == 0, r.stderr
    again = json.load(open(out / "results.json"))
    for task in ("gsm8k", "mmlu", "ceval"):
        assert [p["pred"] for p in again[tiny][task]["predictions"]] == [p["pred"] for p in res[tiny][task]["predictions"]]
    # the resumed letter scores are the uninterrupted run's to the last bit: batches are the whole task's, the
    # same whatever was left to do (a batch of only the questions left rounded otherwise: log-probs differed)
    assert again[tiny]["ceval"]["predictions"] == res[tiny]["ceval"]["predictions"]
    assert [len(open(c).readlines()) for c in caches][1:] == sizes[1:]
    rows = [json.loads(line) for line in open(caches[0])]  # the cut line went: the redone row has a line of its own
    assert len(rows) == len({r["id"] for r in rows}) == sizes[0]
    # a folder with someone else's results.md (and no results.json) or a file named cache is refused, untouched
    for name, why in (("results.md", "not an evaluate.py folder"), ("cache", "a file named cache")):
        other = tmp_path / f"other-{name}"
        other.mkdir()
        (other / name).write_text("mine")
        code, err, _ = evaluate("--model", tiny, "--tasks", "mmlu", "--data-dir", data_dir, "--limit", 2, "--out", other)
        assert code != 0 and why in err and (other / name).read_text() == "mine", err


def test_a_resumed_letter_scoring_run_equals_an_uninterrupted_one(tmp_path, tiny, data_dir):
    """A row's float rounding follows its batch and the few-shot prefixes the engine kept from earlier
    batches: a resume that batched only what was left (or kept other prefixes) wrote other float32
    log-probs. Letter scoring computes segments of one subject from no kept prefix (evaluate.segments)."""
    for shots, bs, keep in ((2, 3, 5), (2, 3, 7), (0, 4, 3)):
        full, res = tmp_path / f"full{shots}{bs}{keep}", tmp_path / f"res{shots}{bs}{keep}"
        args = ["--model", tiny, "--tasks", "mmlu,cmmlu", "--data-dir", data_dir, "--shots", f"mmlu={shots},cmmlu={shots}",
                "--batch-size", bs, "--dtype", "float32"]
        assert evaluate(*args, "--out", full)[0] == 0
        shutil.copytree(full, res)
        for f in (res / "cache").iterdir():
            f.write_text("".join(f.read_text().splitlines(True)[:keep]))
        for f in res.glob("results.*"):
            f.unlink()
        code, err, got = evaluate(*args, "--out", res)
        assert code == 0, err
        want = json.load(open(full / "results.json"))
        for task in ("mmlu", "cmmlu"):
            assert got[tiny][task]["predictions"] == want[tiny][task]["predictions"], (shots, bs, keep, task)


def test_runs_into_one_out_write_their_results_one_at_a_time(tmp_path, tiny, data_dir):
    """Runs of several models into one --out (one per GPU, say) each read results.json, add theirs and
    write it: two finishing together could lose one's results. The read-merge-write waits for the
    folder's lock, here held by this test while the run has finished evaluating."""
    import fcntl
    out = tmp_path / "eval"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", tiny, "--tasks", "mmlu",
                              "--data-dir", data_dir, "--limit", "4", "--dtype", "float32", "--out", out],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in iter(p.stdout.readline, ""):
            if line.startswith(f"{tiny} mmlu:"):  # evaluated: it writes its results next
                break
        assert "another process is writing there; waiting" in p.stdout.readline()  # said, not waited in silence
        time.sleep(1.0)
        assert p.poll() is None and not (out / "results.json").exists()  # waiting for the lock
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    p.wait(timeout=120)
    assert p.returncode == 0 and tiny in json.load(open(out / "results.json"))


def evaluate(*args):
    """evaluate.py run in this process -> (returncode, stderr, results.json of --out or None)."""
    r = run_main(os.path.join(ROOT, "evaluate.py"), *args)
    out = str(args[args.index("--out") + 1])
    path = os.path.join(out, "results.json")
    return r.returncode, r.stderr, json.load(open(path)) if r.returncode == 0 and os.path.exists(path) else None


def test_a_model_that_computes_nan_gets_an_error_not_a_score(tmp_path, data_dir):
    """NaN option log-probs would make every prediction 'A' (max over NaN): a chance-level score for
    a broken model (a diverged run, a bad merge)."""
    from safetensors.torch import load_file, save_file
    model = make_tiny_checkpoint(str(tmp_path / "nan"), seed=1)
    path = os.path.join(model, "model.safetensors")
    w = load_file(path)
    w["model.norm.weight"][0] = float("nan")
    save_file(w, path, metadata={"format": "pt"})
    code, err, res = evaluate("--model", model, "--tasks", "mmlu", "--data-dir", data_dir, "--limit", 2,
                              "--out", tmp_path / "eval")
    assert code != 0 and res is None and "NaN/inf" in err and "no score reported" in err, err
    code, err, res = evaluate("--model", model, "--tasks", "", "--perplexity", os.path.join(ROOT, "tests", "data", "chat.jsonl"),
                              "--out", tmp_path / "ppl")  # NaN in results.json: not JSON (a browser's JSON.parse fails)
    assert code != 0 and res is None and "NaN/inf" in err and "no perplexity reported" in err, err
    assert not os.path.exists(tmp_path / "ppl" / "results.json")


def test_cache_never_serves_another_model_data_or_protocol(tmp_path, data_dir, monkeypatch):
    model = make_tiny_checkpoint(str(tmp_path / "sft"), seed=1)
    data = shutil.copytree(data_dir, tmp_path / "data")
    args = ["--model", model, "--tasks", "mmlu", "--data-dir", data, "--limit", 4, "--out", tmp_path / "eval"]
    logprobs = lambda res: [p["logprobs"] for p in res[model]["mmlu"]["predictions"]]  # noqa: E731
    first = evaluate(*args)[2]
    make_tiny_checkpoint(model, seed=2)  # retrained into the same directory
    second = evaluate(*args)[2]
    assert logprobs(second) != logprobs(first)
    assert logprobs(second) == logprobs(evaluate(*args[:-1], tmp_path / "fresh")[2])
    csv = data / "mmlu" / "test" / "algebra_test.csv"  # an edited benchmark file
    csv.write_text(csv.read_text(encoding="utf-8").replace("问题 0", "问题 zero"), encoding="utf-8")
    third = evaluate(*args)[2]
    assert logprobs(third)[0] != logprobs(second)[0]
    files = len(os.listdir(tmp_path / "eval" / "cache"))
    monkeypatch.setattr(tasks, "PROTOCOL", tasks.PROTOCOL + 1)  # a changed scorer
    evaluate(*args)
    assert len(os.listdir(tmp_path / "eval" / "cache")) == files + 1
    # a row's rounding follows its batch: another --batch-size is another prediction
    fourth = evaluate(*args, "--batch-size", 3)[2]
    assert len(os.listdir(tmp_path / "eval" / "cache")) == files + 2
    assert logprobs(fourth) == logprobs(evaluate(*args[:-1], tmp_path / "fresh3", "--batch-size", 3)[2])
    # the tokenizer's small files are compared by content, not size and time: an edit of the
    # same length with its mtime put back is another model
    config = os.path.join(model, "tokenizer_config.json")
    stat, text = os.stat(config), open(config, encoding="utf-8").read()
    assert "a helpful assistant" in text
    open(config, "w", encoding="utf-8").write(text.replace("a helpful assistant", "a careful assistant"))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fifth = evaluate(*args)[2]
    assert logprobs(fifth) != logprobs(third) and logprobs(fifth) == logprobs(evaluate(*args[:-1], tmp_path / "f5")[2])
    # a chat_template.jinja (read before tokenizer_config.json's template) added, then edited
    template = json.loads(text)["chat_template"].replace("a helpful assistant", "an exact assistant")
    open(os.path.join(model, "chat_template.jinja"), "w", encoding="utf-8").write(template)
    sixth = evaluate(*args)[2]
    assert logprobs(sixth) != logprobs(fifth) and logprobs(sixth) == logprobs(evaluate(*args[:-1], tmp_path / "f6")[2])
    open(os.path.join(model, "chat_template.jinja"), "w", encoding="utf-8").write(template.replace("exact", "honest"))
    seventh = evaluate(*args)[2]
    assert logprobs(seventh) != logprobs(sixth) and logprobs(seventh) == logprobs(evaluate(*args[:-1], tmp_path / "f7")[2])


def test_shots_and_new_tokens_per_task(tmp_path, tiny, data_dir):
    base = ["--model", tiny, "--data-dir", data_dir, "--limit", 2, "--out", tmp_path / "eval"]
    code, err, res = evaluate(*base[:-1], tmp_path / "spaces", "--tasks", "mmlu,ceval", "--shots", "mmlu=1, ceval = 2")
    assert code == 0 and (res[tiny]["mmlu"]["settings"]["shots"], res[tiny]["ceval"]["settings"]["shots"]) == (1, 2), err
    r = run_main(os.path.join(ROOT, "evaluate.py"), *base, "--tasks", "humaneval", "--shots", 5)
    assert r.returncode == 2 and "--shots applies to none of --tasks humaneval" in r.stderr, r.stderr
    code, err, _ = evaluate(*base, "--tasks", "gsm8k,mmlu", "--shots", 5)
    assert code != 0 and "ambiguous" in err and "--shots mmlu=5" in err  # never gsm8k 5-shot silently
    code, err, _ = evaluate(*base, "--tasks", "gsm8k,humaneval", "--max-new-tokens", 64)
    assert code != 0 and "ambiguous" in err
    code, err, _ = evaluate(*base, "--tasks", "mmlu", "--shots", "mmlu=5,mmlu=0")
    assert code != 0 and "names mmlu twice" in err
    code, err, _ = evaluate(*base, "--tasks", "mmlu", "--shots", "mmlu=99")
    assert code != 0 and "--shots 99, but its dev split has" in err  # never fewer exemplars than recorded
    code, err, res = evaluate(*base, "--tasks", "gsm8k,mmlu,humaneval", "--shots", "mmlu=2", "--max-new-tokens", "gsm8k=5")
    assert code == 0, err
    settings = {t: (r["settings"]["shots"], r["settings"]["max_new_tokens"]) for t, r in res[tiny].items()}
    assert settings == {"gsm8k": (4, 5), "mmlu": (2, None), "humaneval": (0, 768)}  # HumanEval's own budget
    generated = res[tiny]["gsm8k"]["predictions"] + res[tiny]["humaneval"]["predictions"]
    assert all(isinstance(p["hit_limit"], bool) for p in generated) and any(p["hit_limit"] for p in generated)


def test_dtype_auto_is_the_default_and_an_explicit_dtype_wins(tmp_path, tiny, data_dir, monkeypatch):
    from nanopost import engine
    base = ["--model", tiny, "--tasks", "mmlu", "--data-dir", data_dir, "--limit", 2]
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2"})  # no native bf16: auto is float32
    r = run_main(os.path.join(ROOT, "evaluate.py"), *base, "--out", tmp_path / "a")
    assert r.returncode == 0 and "--dtype auto: float32 (CPU has neither" in r.stdout
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    for flag, want in ((["--dtype", "float32"], "float32"), ([], "bfloat16")):
        code, err, res = evaluate(*base, *flag, "--out", tmp_path / want)
        assert code == 0, err
        assert res[tiny]["mmlu"]["settings"]["dtype"] == want
        # bf16 on CPU computes attention and greedy tokens as no earlier version did: its own cache key
        assert res[tiny]["mmlu"]["settings"].get("cpu_half") == (2 if want == "bfloat16" else None)


def test_bad_inputs(tmp_path, tiny):
    r = run_eval("--model", tiny, "--tasks", "gsm8k", "--data-dir", tmp_path / "nothing", "--out", tmp_path / "o")
    assert r.returncode != 0 and "--data-dir" in r.stderr and "Traceback" not in r.stderr
    r = run_eval("--model", tiny, "--tasks", "triviaqa", "--data-dir", tmp_path, "--out", tmp_path / "o")
    assert r.returncode != 0 and "unknown task 'triviaqa'" in r.stderr


def test_bad_values_and_malformed_benchmark_files_are_named(tmp_path, tiny, data_dir):
    base = ["--model", tiny, "--limit", 2, "--out", tmp_path / "o"]
    for flags, says in ((["--tasks", "mmlu", "--batch-size", 0], "--batch-size must be at least 1"),
                        (["--tasks", "gsm8k", "--max-new-tokens", "gsm8k=0"], "must be at least 1"),
                        (["--tasks", "gsm8k", "--shots", "gsm8k=-1"], "N must be a whole number"),
                        (["--tasks", ","], "--tasks names no task"),
                        (["--tasks", "mmlu", "--model", tiny + "/"], "is given twice"),
                        (["--tasks", "gsm8k", "--shots", "gsm8k=²"], "N must be a whole number"),
                        (["--tasks", "mmlu", "--perplexity", tmp_path / "a" / "c.jsonl", tmp_path / "b" / "c.jsonl"],
                         "two files share a name (c.jsonl);"),
                        (["--tasks", "mmlu", "--out", __file__], "is a file; give a folder"),
                        *([(["--tasks", "mmlu", "--device", "cuda"], "no CUDA GPU here")] if not torch.cuda.is_available() else [])):
        code, err, _ = evaluate(*base, "--data-dir", data_dir, *flags)
        assert code == 2 and says in err, (flags, err)
    code, err, _ = evaluate(*base, "--data-dir", data_dir, "--tasks", "gsm8k", "--shots", 99)  # 8 train problems
    assert code == 1 and "--shots 99, but" in err and "--download" not in err, err  # present but short: no fetch hint
    code, err, _ = evaluate(*base, "--data-dir", data_dir, "--tasks", "mmlu", "--model", tmp_path / "typo")
    assert code == 1 and "typo: no such directory" in err and not os.path.exists(tmp_path / "o" / "cache"), err
    bad = {"gsm8k/test.jsonl": ('{"question": "q"}\n', r"test.jsonl:1: no string answer"),
           "gsm8k/train.jsonl": ('{"question": "q", "answer": "7"}\n', r"train.jsonl:1: the answer has no final"),
           "mmlu/test/law_test.csv": ('q,a,b,c,d,A\nq,a,b\n', r"law_test.csv:2: 3 fields, expected 6"),
           "cmmlu/test/law.csv": (',Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n', r"law.csv:2: answer 'E' is not"),
           "ceval/val/law_val.csv": ('id,question,A,B,C\n', r"law_val.csv:1: the header 'id,question,A,B,C' lacks D, answer"),
           "mmlu/test/algebra_test.csv": ('q,a,b,c,d,A\nq,a,b,c,d,,\n', r"algebra_test.csv:2: 7 fields, expected 6"),
           "mmlu/test/algebra_test.csv ": ('q,a,b,c,d,A\nq,a,b,c,d,BC\n', r"algebra_test.csv:2: answer 'BC' is not"),
           "mmlu/test/algebra_test.csv  ": ('q,a,b,c,d,\n', r"algebra_test.csv:1: answer '' is not"),
           "cmmlu/test/algebra.csv": (',Question,A,B,C,D,Answer\n', r"algebra.csv: no questions in it"),
           "humaneval/HumanEval.jsonl": ('{"task_id": "x", "prompt": "p"}\n[1]\n', r"HumanEval.jsonl:1: no string test, entry_point"),
           "mmlu/mapping.json": ('{"law": {"category": "Humanities"}}', r"mapping.json: expected \{subject"),
           "ceval/val/law_val.csv ": ('id,question,A,answer,B,C,D\n', r"options A, B, C, D side by side"),
           "cmmlu/test/law.csv ": (b',Question,A,B,C,D,Answer\n0,q,\xff,b,c,d,A\n', r"law.csv:2: not UTF-8 text \(byte 0xff"),
           "gsm8k/test.jsonl ": (b'{"question": "q", "answer": "#### 3"}\n\xff\n', r"test.jsonl:2: not UTF-8")}
    for file, (text, says) in bad.items():
        data = shutil.copytree(data_dir, tmp_path / "data", dirs_exist_ok=True)
        file = file.strip()  # (a trailing space: a second case for the same file)
        saved = (data / file).read_bytes()
        (data / file).write_bytes(text if isinstance(text, bytes) else text.encode())
        code, err, _ = evaluate(*base, "--tasks", file.split("/")[0], "--data-dir", data)  # a traceback would raise
        assert code == 1 and re.search(says, err), (file, err)
        (data / file).write_bytes(saved)
    data = tmp_path / "data"  # a byte-order mark before the header (Excel's UTF-8) is read, not refused
    csv = data / "ceval" / "val" / "law_val.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    assert evaluate(*base, "--tasks", "ceval", "--data-dir", data)[0] == 0


def test_a_relative_model_is_known_from_another_directory(tmp_path, data_dir, monkeypatch):
    """results.json keys a model by --model as given; a local folder's numbers also record its
    absolute path, so from another working directory a relative entry is still that folder's: served,
    its numbers show, and once it is retrained they are left out (the page) or dropped (evaluate.py)."""
    from nanopost import serve
    work, other, b = tmp_path / "work", tmp_path / "other", str(tmp_path / "work" / "runs" / "b")
    other.mkdir()
    make_tiny_checkpoint(b, seed=1)
    c = make_tiny_checkpoint(str(tmp_path / "c"), seed=2)
    out = tmp_path / "eval"
    common = ["--data-dir", data_dir, "--limit", 2, "--out", out, "--tasks", "mmlu"]
    monkeypatch.chdir(work)
    assert evaluate("--model", "runs/b", *common)[0] == 0
    res = json.load(open(out / "results.json"))
    assert res["runs/b"]["mmlu"]["path"] == b
    monkeypatch.chdir(other)
    shown = serve.load_results(str(out / "results.json"), {"b": b})
    assert shown["b"]["mmlu"]["accuracy"] == res["runs/b"]["mmlu"]["accuracy"]
    # evaluated into the same --out from here, runs/b (no folder here) is kept under its own path
    code, err, kept = evaluate("--model", c, *common)
    assert code == 0 and set(kept) == {c, b} and kept[b]["mmlu"] == res["runs/b"]["mmlu"], err
    # and so is it beside another folder spelled the same from here
    make_tiny_checkpoint(str(other / "runs" / "b"), seed=5)
    code, err, both = evaluate("--model", "runs/b", *common)
    assert code == 0 and set(both) == {"runs/b", b, c} and both[b]["mmlu"] == res["runs/b"]["mmlu"], err
    assert both["runs/b"]["mmlu"]["path"] == str(other / "runs" / "b")
    assert serve.load_results(str(out / "results.json"), {"b": b})["b"]["mmlu"]["accuracy"] == shown["b"]["mmlu"]["accuracy"]
    make_tiny_checkpoint(b, seed=3)  # retrained in place
    assert serve.load_results(str(out / "results.json"), {"b": b}) == {"b": {"mmlu": {"stale": True}}}
    r = run_main(os.path.join(ROOT, "evaluate.py"), "--model", c, *common)
    res = json.load(open(out / "results.json"))
    assert r.returncode == 0 and set(res) == {c, "runs/b"} and f"{b} (mmlu)" in r.stdout and "dropped" in r.stdout, r.stdout


def test_evaluating_into_the_same_folder_adds_to_its_results(tmp_path, data_dir):
    """The base today, the fine-tune tomorrow, into one --out: one table with both. A model evaluated
    again replaces its rows; its earlier task scores stay only while its checkpoint is unchanged."""
    base, sft = (make_tiny_checkpoint(str(tmp_path / n), seed=s) for n, s in (("base", 1), ("sft", 2)))
    out = tmp_path / "eval"
    common = ["--data-dir", data_dir, "--limit", 2, "--out", out]
    assert evaluate("--model", base, "--tasks", "mmlu,gsm8k", *common)[0] == 0
    code, err, res = evaluate("--model", sft, "--tasks", "mmlu", *common)
    assert code == 0, err
    assert set(res) == {base, sft} and set(res[base]) == {"mmlu", "gsm8k"} and set(res[sft]) == {"mmlu"}
    md = open(out / "results.md").read()
    assert "| model | mmlu | gsm8k |" in md and f"| {sft} | " in md and "–" in md and "kept from an earlier run" in md
    first_mmlu = res[base]["mmlu"]
    code, err, res = evaluate("--model", sft, "--tasks", "mmlu", "--shots", 1, *common)  # base's 0-shot cell differs
    assert code == 0 and "†" in open(out / "results.md").read() and res[sft]["mmlu"]["settings"]["shots"] == 1
    assert evaluate("--model", sft, "--tasks", "mmlu", *common)[0] == 0  # back to 0-shot, as the earlier table
    code, err, res = evaluate("--model", base, "--tasks", "ceval", *common)  # same checkpoint: its mmlu, gsm8k stay
    assert code == 0 and set(res[base]) == {"mmlu", "gsm8k", "ceval"} and res[base]["mmlu"] == first_mmlu
    make_tiny_checkpoint(base, seed=3)  # retrained in place: its old scores no longer describe it
    code, err, res = evaluate("--model", base, "--tasks", "ceval", *common)
    assert code == 0 and set(res[base]) == {"ceval"} and set(res[sft]) == {"mmlu"}
    make_tiny_checkpoint(sft, seed=4)  # retrained, not evaluated now: its old score goes, with a note
    r = run_main(os.path.join(ROOT, "evaluate.py"), "--model", base + "/", "--tasks", "mmlu", *common)
    res = json.load(open(out / "results.json"))
    assert r.returncode == 0 and sft not in res and f"{sft} (mmlu)" in r.stdout and "dropped" in r.stdout, r.stdout
    assert list(res) == [base + "/"] and set(res[base + "/"]) == {"ceval", "mmlu"}  # base/ is base: one row
    (out / "results.json").write_text("[1, 2]")  # not ours: refused before any work, never overwritten
    code, err, _ = evaluate("--model", base, "--tasks", "ceval", *common)
    assert code == 1 and "is not an evaluate.py results.json" in err and (out / "results.json").read_text() == "[1, 2]"


def test_a_rerun_a_link_and_a_deleted_folder_in_one_out(tmp_path, data_dir):
    """Evaluating a model again into its --out: its cells are this run's (no "kept" mark, no
    "dropped" note); the same folder through a link is one model (refused twice in one run, one row
    across runs); an earlier model whose folder is gone keeps its recorded row."""
    model = make_tiny_checkpoint(str(tmp_path / "m"), seed=1)
    gone = make_tiny_checkpoint(str(tmp_path / "gone"), seed=2)
    out = tmp_path / "eval"
    common = ["--tasks", "mmlu", "--data-dir", data_dir, "--limit", 2, "--out", out]
    script = os.path.join(ROOT, "evaluate.py")
    assert run_main(script, "--model", gone, *common).returncode == 0
    shutil.rmtree(gone)
    r = run_main(script, "--model", model, *common)
    assert r.returncode == 0, r.stderr
    assert set(json.load(open(out / "results.json"))) == {gone, model}
    assert json.load(open(out / "results.json"))[model]["mmlu"]["settings"]["limit"] == 2  # (the page's "limit 2")
    r = run_main(script, "--model", model, *common)
    assert r.returncode == 0 and "dropped" not in r.stdout, r.stdout
    row = next(line for line in open(out / "results.md") if line.startswith(f"| {model} |"))
    assert "*" not in row, row  # computed by this run, not kept from an earlier one
    link = tmp_path / "link"
    os.symlink(model, link)
    r = run_main(script, "--model", model, "--model", link, *common)
    assert r.returncode == 2 and "is given twice" in r.stderr, r.stderr
    for _ in range(2):
        assert run_main(script, "--model", link, *common).returncode == 0
    assert set(json.load(open(out / "results.json"))) == {gone, str(link)}  # the link's row replaces the folder's


def test_a_damaged_cache_line_is_redone(tmp_path, tiny, data_dir):
    args = ["--model", tiny, "--tasks", "mmlu", "--data-dir", data_dir, "--limit", 4, "--out", tmp_path / "eval"]
    first = evaluate(*args)[2]
    (cache,) = (tmp_path / "eval" / "cache").iterdir()
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join([lines[0], "null", "[1, 2]", '{"no": "id"}', *lines[2:]]) + "\n")  # line 2 lost
    code, err, again = evaluate(*args)
    assert code == 0, err
    assert [p["logprobs"] for p in again[tiny]["mmlu"]["predictions"]] == \
        [p["logprobs"] for p in first[tiny]["mmlu"]["predictions"]]


def test_results_settings_and_what_makes_cells_comparable():
    """A cell of another Python's HumanEval verdicts is marked (protocol); the questions asked are
    compared by their hash where it is recorded, not by --limit or --skip-bad-lines; a results.json
    whose settings are not an object is not evaluate.py's."""
    base = {"accuracy": 1.0, "settings": {"shots": 0, "python": "3.11", "skip_bad_lines": False, "limit": 5}}
    assert tasks.protocol(base) != tasks.protocol({**base, "settings": {**base["settings"], "python": "3.8"}})
    with_data = {**base, "data": "abc"}
    for k, v in (("skip_bad_lines", True), ("limit", 7)):
        assert tasks.protocol(with_data) == tasks.protocol({**with_data, "settings": {**base["settings"], k: v}}), k
        assert tasks.protocol(base) != tasks.protocol({**base, "settings": {**base["settings"], k: v}}), k
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        json.dump({"m": {"mmlu": {"accuracy": 1.0, "settings": "shots=5"}}}, open(path, "w"))
        with pytest.raises(ValueError, match="is not an evaluate.py results.json"):
            tasks.read_results(path)


def test_help_shows_defaults():
    r = run_eval("--help")
    assert r.returncode == 0 and "(default: 16)" in r.stdout and "(default: None)" not in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_kto.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "(default: 0.1)" in r.stdout and "(default: 1e-06)" in r.stdout, r.stdout
    assert "random (default: 0)" in r.stdout  # a default of 0 is a default


@pytest.mark.real
@pytest.mark.parametrize("shots", [0, 5])
def test_real_mmlu_predictions_equal_transformers(real_model_dir, shared, shots):
    """20 MMLU questions, letter scoring: our predictions equal an independent transformers run.
    5-shot: 10 questions from each of two subjects, so each exemplar block is a shared prefix."""
    transformers = pytest.importorskip("transformers")
    examples = tasks.load("mmlu", shared, shots)[0]
    if shots:
        subjects = sorted({e["subject"] for e in examples})[:2]
        examples = [e for s in subjects for e in [x for x in examples if x["subject"] == s][:10]]
    else:
        examples = subset(examples, 20)
    assert len(examples) == 20
    model, tok = nanopost.load(real_model_dir)
    prompts = [tok.render(e["messages"], add_generation_prompt=True)[0] for e in examples]
    letters = [tok.encode(L)[0] for L in "ABCD"]
    engine = Engine(model, tok)
    ours = [max(range(4), key=lambda j: lp[j]) for i in range(0, 20, 5)
            for lp in letter_logprobs(engine, prompts[i:i + 5], letters)]
    assert not shots or engine._prefixes  # the exemplar blocks were computed once and shared
    ref = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    htok = transformers.AutoTokenizer.from_pretrained(real_model_dir)
    theirs = []
    with torch.no_grad():
        for e in examples:
            ids = htok.apply_chat_template(e["messages"], add_generation_prompt=True, tokenize=True, return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            theirs.append(int(ref(ids, logits_to_keep=1).logits[0, -1, letters].argmax()))  # the last position's logits
    assert ours == theirs


@pytest.mark.real
@pytest.mark.slow
def test_real_gsm8k_predictions_equal_transformers(real_model_dir, shared):
    """20 GSM8K questions, 4-shot, greedy, 256 new tokens: the same predictions as transformers
    generate on the same prompts (slow: run with -m slow)."""
    transformers = pytest.importorskip("transformers")
    examples = subset(tasks.load("gsm8k", shared)[0], 20)
    model, tok = nanopost.load(real_model_dir)
    replies = Engine(model, tok).generate([e["messages"] for e in examples], Sampling(max_new_tokens=256), batch_size=10)
    ref = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    for e, reply in zip(examples, replies):
        ids = torch.tensor([tok.render(e["messages"], add_generation_prompt=True)[0]])
        out = ref.generate(ids, do_sample=False, max_new_tokens=256, repetition_penalty=1.0,
                           eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
        theirs = tok.decode(out[0, ids.shape[1]:].tolist())
        assert gsm8k.extract(reply) == gsm8k.extract(theirs)


# ---- HumanEval and its sandbox ----

@pytest.fixture(scope="module")
def humaneval_examples(shared):
    return tasks.load("humaneval", shared)[0]


def test_canonical_solutions_pass_and_wrong_ones_fail(humaneval_examples, shared):
    from nanopost.tasks import humaneval
    for ex in humaneval_examples[::16]:  # a sample of 11 problems
        assert humaneval.score(ex, ex["canonical_solution"]) == ("pass", True), ex["id"]
        as_chat = f"Here it is:\n```python\n{ex['prompt']}{ex['canonical_solution']}```\nDone."
        assert humaneval.score(ex, as_chat)[1], ex["id"]
        pred, ok = humaneval.score(ex, "    return None\n")
        assert not ok and pred != "pass"
    raw = tasks.load("humaneval", shared, humaneval_mode="raw")[0][0]
    assert "raw" in raw and "messages" not in raw and raw["stop"]


def test_humaneval_passes_only_when_check_returns():
    """Model code that leaves before check() runs fails (as in OpenAI's human-eval), whatever its
    exit status; a `__main__` block is skipped, as human-eval's exec() skips it."""
    from nanopost.tasks import humaneval
    raw = {**ADD, "mode": "raw"}
    for leave in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "exit()",
                  "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        pass\nunittest.main()"):
        pred, ok = humaneval.score(raw, f"    return a - b\n\n{leave}\n")
        assert not ok and pred != "pass", leave
    assert humaneval.score(raw, "    return a + b\n") == ("pass", True)
    for leave in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):  # in a chat reply's block, where nothing cuts it
        pred, ok = humaneval.score({**ADD, "mode": "chat"}, f"```python\n{WRONG}\n{leave}\n```")
        assert not ok and pred != "pass", leave
        ok, status = humaneval.run_program(f"{WRONG}{leave}\n{ADD['test']}check(add)\n")
        assert not ok and "stopped before the end" in status, status
    main_block = RIGHT + "\nif __name__ == '__main__':\n    assert add(1, 1) == 3\n    import sys\n    sys.exit(1)\n"
    assert humaneval.score({**ADD, "mode": "chat"}, f"```python\n{main_block}```") == ("pass", True)
    # a failure whose last error line reads "pass" (evaluate.py once compared that text with the answer)
    for leave in ('raise SystemExit("pass")', 'import sys, os\nsys.stderr.write("pass\\n")\nos._exit(3)'):
        pred, ok = humaneval.score(raw, f"    return a - b\n\n{leave}\n")
        assert not ok and pred != "pass", (leave, pred)


def test_a_raw_completion_ends_at_its_first_top_level_line():
    """A right body followed by a self-test that fails, a top-level `if`, or a closing code fence
    failed in raw mode; the completion is the function the prompt opened, up to its first line at
    column 0 (the docstring's rule; the Codex stop list cuts at def, class, if, print and #)."""
    from nanopost.tasks import humaneval
    raw = {**ADD, "mode": "raw"}
    for tail in ("\n\nif True:\n    raise SystemExit(1)", "\n\nfor n in [1]:\n    assert add(n, n) == 3",
                 "\n```\n\nThis function adds.", "\nprint(add(1, 2))", "\n\n\n\t\nadd = None"):
        assert humaneval.score(raw, "    return a + b\n" + tail) == ("pass", True), tail
    assert humaneval.raw_body("    x = 1\n\n    return x\nfoo()\n    more", ADD["prompt"]) == "    x = 1\n\n    return x"
    assert humaneval.raw_body("def g(): pass", ADD["prompt"]) == ""  # a first line at column 0 is no body of the prompt's function
    # column 0 inside a string, brackets or after a backslash is not top level (those right bodies failed)
    for body in ('    s = """\nx\n"""\n    return a + b + len(s) - 3\n', '    return (a\n+ b)\n',
                 '    return a + \\\nb\n'):
        assert humaneval.raw_body(body + "print(1)\n", ADD["prompt"]) == body[:-1]
        assert humaneval.score(raw, body + "\nfor n in [1]:\n    assert add(n, n) == 3\n") == ("pass", True), body
    assert humaneval.score(raw, "    return a - b\nprint(1)")[1] is False


def test_a_reply_cannot_finish_into_the_tests():
    """The tests follow the solution in one file: a reply that ends in a dangling decorator would
    decorate the tests' `def check` into a function that checks nothing (blank lines may stand
    between a decorator and its def). A solution that does not compile on its own fails."""
    from nanopost.tasks import humaneval
    dangling = "@lambda f: lambda candidate: None"
    pred, ok = humaneval.score({**ADD, "mode": "raw"}, f"    return None\n    {dangling}\n")  # (at column 0: cut off)
    assert not ok and "does not compile on its own" in pred
    pred, ok = humaneval.score({**ADD, "mode": "chat"}, f"```python\n{WRONG}\n{dangling}\n```")
    assert not ok and "does not compile on its own" in pred
    # a right solution with Windows line ends or a `from __future__` import still passes
    assert humaneval.score({**ADD, "mode": "raw"}, "    return a + b\r\n") == ("pass", True)
    assert humaneval.run_program("def f():\r    return 1\rfrom __future__ import annotations\rassert f() == 1\n") == (True, "passed")
    future = f"```python\nfrom __future__ import annotations\n{RIGHT}```"
    assert humaneval.score({**ADD, "mode": "chat"}, future) == ("pass", True)


def test_a_reply_cannot_replace_the_prompts_helpers_the_tests_use():
    """The tests of HumanEval/32, 38 and 50 call the prompt's helpers (poly, encode_cyclic, ...) as
    their oracle: a reply redefining them (an identity encode with an identity decode) fails."""
    from nanopost.tasks import humaneval
    ex = {"id": "rot/0", "entry_point": "decode", "answer": "pass", "mode": "chat",
          "prompt": 'def encode(s):\n    return s[1:] + s[:1]\n\n\ndef decode(s):\n    """encode\'s inverse"""\n',
          "test": "def check(candidate):\n    assert candidate(encode('abcd')) == 'abcd'\n"}
    right = "```python\ndef decode(s):\n    return s[-1:] + s[:-1]\n```"
    assert humaneval.score(ex, right) == ("pass", True)
    assert humaneval.score(ex, "```python\ndef encode(s):\n    return s\n\ndef decode(s):\n    return s\n```")[1] is False
    assert humaneval.score({**ex, "mode": "raw"}, "    return s\n\ndef encode(s):\n    return s\n")[1] is False
    # a helper the tests do not call stays the reply's own (HumanEval/10: a reply's is_palindrome(s, i))
    pal = {"id": "pal/0", "entry_point": "make", "answer": "pass", "mode": "chat",
           "prompt": 'def is_pal(s):\n    return s == s[::-1]\n\n\ndef make(s):\n    """shortest palindrome starting with s"""\n',
           "test": "def check(candidate):\n    assert candidate('ab') == 'aba'\n    assert candidate('') == ''\n"}
    own = ("```python\ndef is_pal(s, i):\n    return s[i:] == s[i:][::-1]\n\ndef make(s):\n    i = 0\n"
           "    while i < len(s) and not is_pal(s, i):\n        i += 1\n    return s + s[:i][::-1]\n```")
    assert humaneval.score(pal, own) == ("pass", True)


@pytest.mark.parametrize("reply", [
    f"Here is the function:\n```python\n{RIGHT}",  # cut off by the token limit before the closing fence
    f"```python3\n{RIGHT}```",
    f"```py\n{RIGHT}```\n",
    f"```\n{RIGHT}```",
    f"```Python\n{RIGHT}```\nThis adds the numbers.",
    f"```python\n{RIGHT}```\n\nExample usage:\n```python\nprint(add(2, 3))  # 5\n```\n",  # the function, then a demo
    f"```python\n{RIGHT}```\nRun it with:\n```bash\npython add.py\n```\nThat's all.",
    f"First a wrong try:\n```python\n{WRONG}```\nFixed:\n```python\n{RIGHT}```",
])
def test_humaneval_code_extraction(reply):
    from nanopost.tasks import humaneval
    assert humaneval.score({**ADD, "mode": "chat"}, reply) == ("pass", True)
    assert humaneval.extract_code(reply, "add").strip() == RIGHT.strip()


def test_humaneval_extraction_edges():
    """Correct code in the shapes models write it passes: ~~~ and indented fences, a helper in a
    block of its own (before or after), a `from __future__` import, prose around unfenced code; the
    other blocks' example calls do not run, and a wrong helper still fails."""
    from nanopost.tasks import humaneval
    helper = "def helper(a, b):\n    return a + b\n"
    uses = "def add(a, b):\n    return helper(a, b)\n"
    indented = "".join("   " + line for line in RIGHT.splitlines(True))
    demo = "```python\nprint(add(1, 2))\nassert add(1, 1) == 3\nTOTAL = 7\n```\n"
    for reply in (f"~~~python\n{RIGHT}~~~\nDone.",
                  f"1. Write the function:\n   ```python\n{indented}   ```\n2. Call it.",
                  f"```python\nfrom __future__ import annotations\n{RIGHT}```",
                  f"First a helper:\n```python\n{helper}```\nThen:\n```python\n{uses}```\nExample:\n{demo}",
                  f"```python\n{uses}```\nwhere\n```python\nimport math\n{helper}print(helper(1, 2))\n```",
                  f"Sure! Here is the function:\n\n{RIGHT}\nIt returns the sum of a and b.",
                  f"Here:\n\n{RIGHT}"):
        assert humaneval.score({**ADD, "mode": "chat"}, reply) == ("pass", True), reply
    # other blocks give only what the main block needs: a test block's imports, an example's
    # assignments that shadow a module or builtin, a redefinition of something the prompt defines stay out
    test_block = "```python\nimport unittest\nfrom solution import add\nclass T(unittest.TestCase):\n    pass\n```"
    shadows = "```python\nstring = 'Hello'\nlist = [1, 2]\nd = {[1]: 2} if False else {}\nx = {(1, 2): {}}\n```"
    uses_module = "import string\ndef add(a, b):\n    return len(string.digits[:a]) + b if a >= 0 else a + b\n"
    for reply in (f"```python\n{RIGHT}```\nTests:\n{test_block}", f"```python\n{uses_module}```\n{shadows}",
                  f"```python\n{RIGHT}```\n```python\nd = {{[1.0, 2.0]: 0.5}}\n```",  # not a literal: no crash
                  f"Sure.\nfrom the examples, we add.\n\n{RIGHT}\nThat's it.",  # prose that starts like an import
                  f"~~~~~~~~~~\nNotes\n~~~~~~~~~~\n```python\n{RIGHT}```",  # ~~~ separators are not fences
                  f"````markdown\n```python\n{RIGHT}```\n````\n",  # four backticks are not a ``` fence
                  "```\n    return a + b\n```",  # the body alone in a bare fence
                  f"import this into your file:\n{RIGHT}",  # prose that starts like code, then the code
                  "```python\nimport operator as op\n```\n```python\ndef add(a, b):\n    return op.add(a, b)\n```",
                  # another block's literal constant is carried; its example code (input()) is not
                  "```python\nOFFSET = 0\n```\n```python\ndef add(a, b):\n    return a + b + OFFSET\n```\nTry it:\n"
                  "```python\nOFFSET = int(input())\nprint(add(2, 3))\n```"):
        assert humaneval.score({**ADD, "mode": "chat"}, reply) == ("pass", True), reply
    # tests that call the entry point by name: the prompt's stub must not be put back over the reply's
    by_name = {**ADD, "mode": "chat", "test": "def check(candidate):\n    assert add(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
    assert humaneval.score(by_name, f"```python\n{RIGHT}```") == ("pass", True)
    with_helper = {**ADD, "prompt": "def double(x):\n    return 2 * x\n\n\n" + ADD["prompt"],
                   "test": "def check(candidate):\n    assert double(candidate(2, 3)) == 10\n"}
    assert not humaneval.score({**with_helper, "mode": "chat"}, "```python\ndef add(a, b):\n    return double(0)\n```\n"
                               "```python\ndef double(x):\n    return 10\n```")[1]  # the prompt's double stays
    target = f"/tmp/nanopost-future-{os.getpid()}"
    open(target, "w").close()
    try:  # only a plain `from __future__ import ...` line moves above the sandbox's guard
        ok, status = humaneval.run_program(f"from __future__ import annotations; import os; os.remove({target!r})")
        assert not ok and os.path.exists(target), status
    finally:
        os.remove(target)
    wrong_helper = f"```python\n{uses}```\n```python\ndef helper(a, b):\n    return a * b\n```"
    assert not humaneval.score({**ADD, "mode": "chat"}, wrong_helper)[1]
    assert not humaneval.score({**ADD, "mode": "chat"}, f"Here it is:\n\n{WRONG}\nIt adds them.")[1]
    code = humaneval.extract_code(f"```python\n{uses}```\n{demo}```python\nimport os\n{helper}print(1)\n```", "add")
    assert code.startswith(uses) and helper in code and "print" not in code and "assert" not in code and "os" not in code


def test_humaneval_helpers_in_source_order_and_what_binds():
    """Review cases: carried definitions keep the reply's order (an import before the decorator that
    uses it, a base class before its subclass); `result[0] = 2.0` binds nothing, so it is not carried
    as if it defined `result`; another block's star import is carried (before the main block) only
    when a used name is bound nowhere; a parenthesized `from __future__` import is hoisted."""
    from nanopost.tasks import humaneval
    chat = {**ADD, "mode": "chat"}
    decorated = ("```python\ndef add(a, b):\n    return plus(a, b)\n```\n"
                 "```python\nimport functools\n\n@functools.lru_cache(None)\ndef plus(a, b):\n    return a + b\n```")
    subclass = ("```python\ndef add(a, b):\n    return Adder().run(a, b)\n```\n"
                "```python\nclass Base:\n    def run(self, a, b):\n        return a + b\n\n"
                "class Adder(Base):\n    pass\n```")
    # a form feed (a page break), U+2028 in a string: not line ends for Python, though str.splitlines
    # breaks there; the carried helper was cut at the wrong lines (an IndentationError: a fail)
    shifted = [decorated.replace("import functools\n", "import functools\x0c\n")] + \
        [decorated.replace("import functools\n", f'import functools\nPAGE = "a{c}b"\n') for c in ("\u2028", "\x85")]
    for reply in (decorated, subclass, *shifted):
        assert humaneval.score(chat, reply) == ("pass", True), humaneval.extract_code(reply, "add")
    code = humaneval.extract_code(subclass, "add")
    assert code.index("class Base") < code.index("class Adder")
    store = ("```python\nresult = [0]\ndef add(a, b):\n    result[0] = a + b\n    return result[0]\n```\n"
             "```python\nresult[0] = 2.0\nresult = [5]\n```")
    assert humaneval.score(chat, store) == ("pass", True)
    assert "2.0" not in humaneval.extract_code(store, "add")
    main = "def add(a, b):\n    return sum(islice(count(a), 1)) + b\n"
    star = f"```python\n{main}```\n```python\nfrom itertools import *\nfrom solution import add\n```"
    assert humaneval.score(chat, star) == ("pass", True), humaneval.extract_code(star, "add")
    # no name is missing: a test block's star import stays out
    plain = f"```python\n{RIGHT}```\n```python\nfrom solution import *\nassert add(1, 2) == 3\n```"
    assert humaneval.extract_code(plain, "add").strip() == RIGHT.strip()
    for future in ("from __future__ import (annotations)", "from __future__ import (\n    annotations,\n)",
                   "from __future__ import annotations\r"):  # a lone \r ends a line for Python
        assert humaneval.score(chat, f"```python\nimport math\n{future}\n{RIGHT}```") == ("pass", True), future
    # second review: a star import is carried only from the standard library and only when the main
    # block has none of its own; a repeated import further down does not move the first one's place
    floor = "from math import *\ndef add(a, b):\n    return floor(a) + b\n"
    for other in ("from solution import *\nassert add(1, 2) == 3\n", "from itertools import *\n"):
        assert humaneval.score(chat, f"```python\n{floor}```\n```python\n{other}```") == ("pass", True), other
    annotated = ("from __future__ import annotations\ndef add(a: Real, b: Real) -> Real:\n    return a + b\n")
    assert humaneval.score(chat, f"```python\n{annotated}```\n```python\nfrom my_solution import *\n```") == ("pass", True)
    repeated = ("```python\nfrom functools import lru_cache\n\n@lru_cache(None)\ndef plus(a, b):\n    return a + b\n```\n"
                "```python\ndef add(a, b):\n    return plus(a, b)\n```\n"
                "```python\nfrom functools import lru_cache\nprint(add(1, 2))\n```")
    assert humaneval.score(chat, repeated) == ("pass", True), humaneval.extract_code(repeated, "add")
    # ... while a helper fixed in a later block is the one carried (a function body looks it up when called)
    fixed = ("```python\ndef plus(a, b):\n    return a - b\n\ndef run(a, b):\n    return plus(a, b)\n```\n"
             "Fixed:\n```python\ndef plus(a, b):\n    return a + b\n```\n"
             "```python\ndef add(a, b):\n    return run(a, b)\n```")
    assert humaneval.score(chat, fixed) == ("pass", True), humaneval.extract_code(fixed, "add")
    # the sandbox's guard stays above everything but plain __future__ lines, whatever ends a line
    target = f"/tmp/nanopost-future-cr-{os.getpid()}"
    escape = f"from __future__ import (annotations)  # ok\rimport os; open({target!r}, 'w').write('x')\n"
    assert not humaneval.run_program(escape)[0] and not os.path.exists(target)


def test_sandbox_contains_bad_programs(tmp_path):
    from nanopost.tasks.humaneval import run_program
    assert run_program("while True:\n    pass\n", timeout=2) == (False, "timeout")
    target = tmp_path / "escape.txt"
    ok, status = run_program(f"open({str(target)!r}, 'w').write('x')")
    assert not ok and "outside the scratch directory" in status and not target.exists()
    ok, status = run_program("import os\nfd = os.open(%r, os.O_WRONLY | os.O_CREAT)" % str(target))
    assert not ok and not target.exists()
    assert run_program("x = bytearray(50 * 1024**3)") == (False, "MemoryError")
    # a sibling whose name starts with the scratch folder's is outside it
    ok, status = run_program("import os\np = os.getcwd() + '_x'\nprint(p)\nopen(p, 'w').write('escaped')\n")
    assert not ok and "outside the scratch directory" in status, status
    assert run_program("import subprocess\nsubprocess.run(['true'])")[0] is False
    # a process in a session of its own would outlive the timeout's killpg; and stderr goes to a file
    # (bounded, never held by the parent, never kept open by a grandchild)
    t = time.time()
    assert run_program("import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {}, setsid=True)\n"
                       "while True:\n    pass\n", timeout=2) == (False, "PermissionError: blocked by the nanopost HumanEval sandbox")
    assert run_program("import sys\nwhile True:\n    sys.stderr.write('x' * 1000000)\n", timeout=5)[0] is False
    assert time.time() - t < 10
    assert run_program("import os\nassert 'HF_TOKEN' not in os.environ and len(os.environ) < 10\n"
                       "open('inside.txt', 'w').write('fine')") == (True, "passed")
    # writes outside through other public calls (a file outside was emptied and chmod-ed to 0), and a pidfd
    # signal to the evaluating process (it was killed: rc 137, its scratch folder left behind)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for program in (f"import io\nio.FileIO({str(tmp_path / 'f.txt')!r}, 'w').write(b'x')",
                    f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
                    f"os.close(os.open('victim.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=d))",
                    f"import os\nos.makedirs({str(tmp_path / 'a' / 'b')!r})",
                    f"import os\nos.fchmod(os.open({str(victim)!r}, os.O_RDONLY), 0)",
                    f"import sqlite3\nsqlite3.connect({str(tmp_path / 'db.sqlite')!r}).execute('create table t(x)')",
                    f"import sqlite3\nsqlite3.connect('file:{tmp_path}/u.sqlite', uri=True).execute('create table t(x)')",
                    f"import sqlite3\nsqlite3.connect(':memory:').execute(\"ATTACH '{tmp_path}/a.db' AS o\")",
                    f"import sqlite3\nsqlite3.Connection({str(tmp_path / 'c.db')!r})",
                    "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_CPU, (1, 1))",
                    # public modules that reach the same calls another way: posix (os's functions), bz2 (its
                    # own reference to open), a Unix socket's file, multiprocessing's fresh interpreter
                    f"import posix\nposix.close(posix.open({str(tmp_path / 'p.txt')!r}, posix.O_WRONLY | posix.O_CREAT))",
                    "import os, posix\nposix.kill(os.getppid(), 0)",
                    f"import bz2\nbz2.open({str(tmp_path / 'x.bz2')!r}, 'wb').write(b'x')",
                    f"import socket\nsocket.socket(socket.AF_UNIX).bind({str(tmp_path / 's.sock')!r})",
                    "import multiprocessing as mp\nmp.get_context('spawn').Process(target=print).start()",
                    f"import pathlib\npathlib.Path({str(tmp_path / 't.txt')!r}).touch()",
                    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)"):
        ok, status = run_program(program)
        assert not ok and status.startswith("PermissionError"), (program, status)
    assert sorted(os.listdir(tmp_path)) == ["victim.txt"] and victim.read_text() == "keep"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert run_program("import io, os, pathlib\n"
                       "os.mkdir('d'); io.FileIO('d/x', 'w').write(b'1'); pathlib.Path('z').touch()") == (True, "passed")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/self/schedstat"),
                    reason="needs Linux's CPU affinity and scheduler statistics")
def test_sandbox_time_limit_ignores_a_busy_machine():
    """A program that needs 1 s of CPU passes a 2.5 s limit while three busy loops share its one CPU
    (about 4 s of wall-clock time): time spent waiting for the CPU is not the program's. A program
    that sleeps past the limit still times out."""
    from nanopost.tasks.humaneval import run_program
    assert run_program("import time\ntime.sleep(30)\n", timeout=1) == (False, "timeout")
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})  # children inherit it
    # each in a session of its own, as the program is: the kernel shares a CPU fairly between sessions
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(3)]
    try:
        t = time.time()
        result = run_program("import time\nwhile time.process_time() < 1.0:\n    pass\n", timeout=2.5)
        wall = time.time() - t
    finally:
        for b in busy:
            b.kill()
            b.wait()
        os.sched_setaffinity(0, before)
    assert wall > 2.5, f"the CPU was not shared ({wall:.1f} s): the test proves nothing"
    assert result == (True, "passed"), (result, wall)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="finds the program's process in /proc")
def test_ctrl_c_while_a_program_runs_leaves_no_process_behind():
    """The program runs in a session of its own (Ctrl-C never reaches it): interrupting the caller
    must kill it, or a sleeping program outlives evaluate.py."""
    code = ("from nanopost.tasks.humaneval import run_program\n"
            "run_program('import time\\ntime.sleep(120)\\n', timeout=100)")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT})

    def children():
        kids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == p.pid:  # (the 4th field, after the name in brackets)
                kids.append(int(pid))
        return kids

    t0 = time.time()
    while not (kids := children()) and time.time() - t0 < 60:
        time.sleep(0.1)
    assert kids, "the program never started"
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    time.sleep(0.5)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}")], "the program outlived its caller"


def test_empty_duplicate_and_unreadable_benchmark_files_are_errors(tmp_path, data_dir):
    """An empty benchmark is an error, not "None% of 0"; a HumanEval task_id given twice (results are
    keyed by it) and a CSV whose stray quote runs a field to the end of the file name file:line."""
    from nanopost.data import DataError
    d = shutil.copytree(data_dir, tmp_path / "data")
    (d / "gsm8k" / "test.jsonl").write_text("")
    with pytest.raises(DataError, match=r"gsm8k/test.jsonl: no problems in it"):
        tasks.load("gsm8k", str(d))
    for f in (d / "mmlu" / "test").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"mmlu/test: no .csv file of questions"):
        tasks.load("mmlu", str(d))
    he = d / "humaneval" / "HumanEval.jsonl"
    row = json.loads(he.read_text().splitlines()[0])
    he.write_text(json.dumps(row) + "\n" + json.dumps({**row, "entry_point": "other"}) + "\n")
    with pytest.raises(DataError, match=r"HumanEval.jsonl:2: task_id .* again \(first on line 1\)"):
        tasks.load("humaneval", str(d))
    he.write_text("")
    with pytest.raises(DataError, match=r"HumanEval.jsonl: no problems in it"):
        tasks.load("humaneval", str(d))
    big = d / "ceval" / "val" / "algebra_val.csv"
    lines = big.read_text(encoding="utf-8").splitlines(True)
    body = [f"{i},question {i} {'x' * 60},a,b,c,d,A\n" for i in range(3000)]
    body[5] = '"' + body[5]  # the field never closes: csv reads on past its 131072-character limit
    big.write_text(lines[0] + "".join(body), encoding="utf-8")
    with pytest.raises(DataError, match=r"algebra_val.csv:\d+: not CSV that reads .*a stray quote"):
        tasks.load("ceval", str(d))


def test_runner_humaneval_raw_mode(tmp_path, tiny, shared):
    r = run_eval("--model", tiny, "--tasks", "humaneval", "--humaneval-mode", "raw", "--data-dir", shared,
                 "--limit", 3, "--max-new-tokens", 8, "--out", tmp_path / "he")
    assert r.returncode == 0, r.stderr
    res = json.load(open(tmp_path / "he" / "results.json"))[tiny]["humaneval"]
    assert res["n"] == 3 and res["accuracy"] == 0.0  # a random model passes nothing, and the run survives
    assert (res["settings"]["humaneval_mode"], res["settings"]["limit"]) == ("raw", 3)  # recorded for the table's marks


def test_perplexity_and_chart(tmp_path, tiny, data_dir):
    from evaluate import perplexity
    from nanopost.data import collate, load_sft
    from nanopost.losses import reference_sft_loss_sum
    from nanopost.tokenizer import IGNORE
    data = os.path.join(ROOT, "tests", "data", "chat.jsonl")
    model, tok = nanopost.load(tiny)
    exs = load_sft([data], tok, 4096)[0][0]
    nll = n = 0.0
    with torch.no_grad():
        for i in range(len(exs)):  # one conversation at a time, full logits
            ids, labels, pos = collate([[i]], exs, tok.pad_id)
            nll += reference_sft_loss_sum(model, ids, labels, pos).item()
            n += (labels[:, 1:] != IGNORE).sum().item()
    assert perplexity(model, tok, data, batch_size=5) == pytest.approx(float(torch.tensor(nll / n).exp()), rel=1e-5)
    pytest.importorskip("matplotlib")
    r = run_eval("--model", tiny, "--tasks", "mmlu", "--data-dir", data_dir, "--perplexity", data, "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "results.png").stat().st_size > 1000
    assert "ppl:chat.jsonl" in open(tmp_path / "p" / "results.md").read()


def test_bad_perplexity_lines_and_limit_are_refused_clearly(tmp_path, tiny, data_dir):
    """A malformed --perplexity line is named (file:line) with a hint evaluate.py accepts
    (--skip-bad-lines, which then drops it with a warning); --limit below 1 is refused up front."""
    good = open(os.path.join(ROOT, "tests", "data", "chat.jsonl")).read()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "{not json\n")
    n = good.count("\n") + 1
    here = lambda *a: run_main(os.path.join(ROOT, "evaluate.py"), *a)  # noqa: E731
    args = ("--model", tiny, "--tasks", "mmlu", "--limit", "2", "--data-dir", data_dir, "--perplexity", bad)
    r = here(*args, "--out", tmp_path / "e1")
    assert r.returncode != 0 and f"bad.jsonl:{n}" in r.stderr and "--skip-bad-lines" in r.stderr, r.stderr
    assert not (tmp_path / "e1").exists()  # refused before anything was written
    r = here(*args, "--skip-bad-lines", "--out", tmp_path / "e2")
    assert r.returncode == 0, r.stderr
    assert "ppl:bad.jsonl" in open(tmp_path / "e2" / "results.md").read()
    # another model on another file of the same name, into the same folder: the kept number is marked
    other = make_tiny_checkpoint(str(tmp_path / "other"), seed=3)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "bad.jsonl").write_text(good)
    r = here("--model", other, "--tasks", "mmlu", "--limit", "2", "--data-dir", data_dir,
             "--perplexity", tmp_path / "o" / "bad.jsonl", "--out", tmp_path / "e2")
    assert r.returncode == 0, r.stderr
    table = open(tmp_path / "e2" / "results.md").read()
    assert table.count("†") == 2 and "*†" in table.split(f"| {tiny} |")[1].split("\n")[0], table  # one cell + the legend
    saved = json.load(open(tmp_path / "e2" / "results.json"))
    assert saved[tiny]["ppl:bad.jsonl"]["settings"]["skip_bad_lines"] is True
    assert saved[tiny]["ppl:bad.jsonl"]["data"] != saved[other]["ppl:bad.jsonl"]["data"]
    # a later run without that column: both its cells are kept, and still not comparable
    r = here("--model", other, "--tasks", "ceval", "--limit", "2", "--data-dir", data_dir, "--out", tmp_path / "e2")
    assert r.returncode == 0, r.stderr
    table = open(tmp_path / "e2" / "results.md").read()
    cells = {m: table.split(f"| {m} |")[1].split("\n")[0].split("|")[-2].strip() for m in (tiny, other)}
    assert "| ppl:bad.jsonl |\n" in table and all(c.endswith("*†") for c in cells.values()), table  # its last column
    assert table.count("†") == 3, table  # those two + the legend
    r = here("--model", tiny, "--tasks", "gsm8k", "--limit", "-1", "--data-dir", data_dir, "--out", tmp_path / "e3")
    assert r.returncode == 2 and "--limit must be at least 1" in r.stderr


@pytest.mark.parametrize("launched", ["foreground", "with SIGINT ignored"])
def test_ctrl_c_keeps_the_predictions_and_the_same_command_resumes(tmp_path, tiny, data_dir, launched):
    """Ctrl-C mid-run: exit 130 with a line saying what is kept (no traceback), also when started with
    SIGINT ignored (a background job, nohup); the rerun keeps the cached rows and finishes."""
    import signal
    import time
    out = tmp_path / "eval"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", tiny, "--tasks", "gsm8k", "--data-dir",
           data_dir, "--limit", "3", "--max-new-tokens", "gsm8k=120", "--batch-size", "1", "--dtype", "float32",
           "--out", out]
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if launched != "foreground" else None
    p = subprocess.Popen(list(map(str, cmd)), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         preexec_fn=ignore)
    rows = lambda: sum(len(open(f).readlines()) for f in (out / "cache").glob("*.jsonl")) if (out / "cache").exists() else 0  # noqa: E731
    t0 = time.time()
    while rows() < 1 and time.time() - t0 < 120:
        time.sleep(0.05)
    kept = rows()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and f"interrupted: every prediction made so far is cached in {out / 'cache'};" in err, err[-2000:]
    assert "Traceback" not in err and kept >= 1
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())[str(tiny)]["gsm8k"]
    assert res["n"] == 3 and rows() == 3


def test_humaneval_verdicts_are_not_reused_under_another_python(tmp_path, tiny, shared):
    """A HumanEval verdict is what the Python running the program makes of it (a removed module, a
    changed builtin): a cache of verdicts from another Python version must not be resumed from."""
    out = tmp_path / "he"
    args = ["--model", tiny, "--tasks", "humaneval", "--data-dir", shared, "--limit", 1, "--max-new-tokens", 4,
            "--out", out]
    r = run_eval(*args)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "results.json"))[tiny]["humaneval"]
    assert res["settings"]["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = ("import platform, runpy, sys; platform.python_version_tuple = lambda: ('3', '99', '0'); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", other, os.path.join(ROOT, "evaluate.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len([f for f in os.listdir(out / "cache") if f.startswith("humaneval-")]) == 2  # its own file, not the first's
    assert json.load(open(out / "results.json"))[tiny]["humaneval"]["settings"]["python"] == "3.99"
