"""Four-option multiple choice: MMLU (test), CMMLU (test), C-Eval (val; its test labels are
hidden). Zero- or k-shot (dev exemplars of the same subject) in one user turn. Scored by the
next-token log-probs of the option letters right after the assistant header (default), or by
generating a reply and extracting the letter (mode "generate", as the paper's scripts did)."""
import bisect
import csv
import json
import os
import re

from nanopost.data import DataError

LETTERS = "ABCD"
MAPPINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mappings")  # shipped tables
SPLITS = {"mmlu": "test", "cmmlu": "test", "ceval": "val"}
HEAD = {"mmlu": "The following are multiple choice questions (with answers) about {name}.\n\n",
        "cmmlu": "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n",
        "ceval": "以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"}
# each benchmark's own question layout (Hendrycks' MMLU code, but one space after "about" as lm-evaluation-harness:
# his format_subject puts two; CMMLU's src/mp_utils.py, C-Eval's evaluators):
# MMLU's exemplar answers follow a space ("Answer: B"), CMMLU's and C-Eval's follow the colon ("答案是：B")
QUESTION = {"mmlu": "", "cmmlu": "题目：", "ceval": ""}
ANSWER = {"mmlu": "Answer:", "cmmlu": "答案是：", "ceval": "答案："}
SPACE = {"mmlu": " ", "cmmlu": "", "ceval": ""}
# a second category a benchmark's own scripts report for some subjects (CMMLU's src/categories.py), whatever
# mapping.json gives as their first
ALSO = {"cmmlu": {"China specific": {
    "ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule", "chinese_food_culture",
    "chinese_foreign_policy", "chinese_history", "chinese_literature", "chinese_teacher_qualification",
    "construction_project_management", "elementary_chinese", "elementary_commonsense", "ethnology",
    "high_school_politics", "modern_chinese", "traditional_chinese_medicine"}}}
OVER_SUBJECTS = {"cmmlu", "ceval"}  # accuracy = the mean of the subjects' (their scripts); MMLU's pools all questions


def read_csv(task, path):
    """Rows as (question, [A, B, C, D], answer letter) in each benchmark's own layout; a malformed
    file is a DataError naming file:line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not a column name
            reader = csv.reader(f)
            try:
                return _read_rows(task, path, reader)
            except csv.Error as e:  # a stray quote runs a field to the end of the file
                raise DataError(f"{path}:{reader.line_num}: not CSV that reads ({e}); a stray quote?") from None
    except UnicodeDecodeError:  # its position is within a chunk of the file: find the line anew
        raw = open(path, "rb").read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}, {e.reason})") from None
        raise


def _read_rows(task, path, reader):
    out = []
    if task == "mmlu":  # no header: question,A,B,C,D,answer
        q, a, ans = 0, 1, 5
    else:
        row = next(reader, [])
        header = [h.strip().lower() for h in row]
        missing = [c for c in ("question", "A", "B", "C", "D", "answer") if c.lower() not in header]
        if missing:
            raise DataError(f"{path}:1: the header {','.join(row)!r} lacks {', '.join(missing)}")
        q, a, ans = header.index("question"), header.index("a"), header.index("answer")
        if header[a:a + 4] != ["a", "b", "c", "d"]:
            raise DataError(f"{path}:1: the header {','.join(row)!r} does not have the options A, B, C, D side by side")
    for r in reader:
        if not any(x.strip() for x in r):
            continue
        if len(r) <= max(q, a + 3, ans) or (task == "mmlu" and len(r) != 6):
            raise DataError(f"{path}:{reader.line_num}: {len(r)} fields, expected {max(q, a + 3, ans) + 1}")
        if r[ans].strip() not in tuple(LETTERS):
            raise DataError(f"{path}:{reader.line_num}: answer {r[ans]!r} is not one of A, B, C, D")
        out.append((r[q], r[a:a + 4], r[ans].strip()))
    if not out:
        raise DataError(f"{path}: no questions in it")
    return out


def subject_files(task, data_dir, split):
    folder = os.path.join(data_dir, task, split)
    suffix = "" if task == "cmmlu" else f"_{split}"
    return {f[: -len(suffix + ".csv")]: os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".csv")}


def format_question(task, question, options, answer=None):
    text = QUESTION[task] + question + "\n" + "".join(f"{L}. {o}\n" for L, o in zip(LETTERS, options)) + ANSWER[task]
    return text + (f"{SPACE[task]}{answer}\n\n" if answer else "")


def load(task: str, data_dir: str, shots: int = 0):
    path = os.path.join(data_dir, task, "mapping.json")
    if not os.path.exists(path):  # the table shipped with nanopost
        path = os.path.join(MAPPINGS, f"{task}.json")
    with open(path, encoding="utf-8") as f:
        try:
            mapping = json.load(f)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(mapping, dict) and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                              and isinstance(v.get("category"), str) for v in mapping.values())):
        raise DataError(f"{path}: expected {{subject: {{\"name\": str, \"category\": str}}}}")
    dev = subject_files(task, data_dir, "dev") if shots else {}
    examples = []
    subjects = subject_files(task, data_dir, SPLITS[task])
    if not subjects:  # a score of nothing would read as a result
        raise DataError(f"{os.path.join(data_dir, task, SPLITS[task])}: no .csv file of questions in it")
    for subject, path in subjects.items():
        info = mapping.get(subject, {"name": subject.replace("_", " "), "category": "Other"})
        prefix = HEAD[task].format(name=info["name"])
        if shots:
            if subject not in dev:
                raise DataError(f"{task} {subject}: --shots {shots}, but {os.path.join(data_dir, task, 'dev')} has no "
                                f"file for it")
            exemplars = read_csv(task, dev[subject])
            if len(exemplars) < shots:  # never fewer than the results say
                raise ValueError(f"{task} {subject}: --shots {shots}, but its dev split has {len(exemplars)} questions")
            prefix += "".join(format_question(task, q, o, a) for q, o, a in exemplars[:shots])
        for i, (q, opts, ans) in enumerate(read_csv(task, path)):
            also = [c for c, members in ALSO.get(task, {}).items() if subject in members]
            examples.append({"id": f"{subject}/{i}", "subject": subject, "category": info["category"], "answer": ans,
                             **({"also": also} if also else {}),
                             "messages": [{"role": "user", "content": prefix + format_question(task, q, opts)}]})
    return examples


# Letter extraction for --mode generate, after OpenCompass' first_option_postprocess and
# lm-evaluation-harness' MMLU generative filters: an ordered table, the first pattern that matches
# decides (with its first match). Only capital A-D count ("a" is a word), and only standing alone:
# not in a word joined by a hyphen or digits ("B-cell", "T-B", "B12", "3D").
# No two neighbouring quantifiers may match the same characters (a run of '*' or spaces would then
# take polynomial time: seconds on a degenerate 2000-character reply), hence the one-class runs.
LETTER = r"([A-D])(?![A-Za-z0-9]|-[A-Za-z0-9])"
ALONE = r"(?<![A-Za-z0-9])(?<![A-Za-z0-9]-)"  # before a letter: not the end of a word it is joined to
LEAD = r"[\s:：*(\[（]*"  # what may stand between a keyword and its letter: space, a colon, bold, a bracket
# not letters ruled out together: "A and B are wrong", "A, B, and C are incorrect", "A、B都错误" (a plural:
# one letter "is false" may be the answer to "Which statement is false?")
WRONG_TOGETHER = r"\s*(?:are(?:\s+(?:both|all))?\s+(?:wrong|incorrect|false|not)\b|(?:都|均)(?:错误|不对|不正确))"
JOINED = r"(?:\s*(?:,\s*and|,\s*or|,|and|or|、|和|或)\s*[(\[（*]*[A-D](?![A-Za-z])[)\]）*]*)"
RULED_OUT = r"(?![)\]）*]*(?:" + JOINED + "*" + WRONG_TOGETHER + "|" + JOINED + r"+\s*(?:错误|不对|不正确)))"
VERB = r"(?:is|would be|should be|will be)\b"
EXTRACTION = [re.compile(p) for p in (
    # $\boxed{B}$
    r"\\boxed\{([A-D])\}",
    # 答案是B, 答案：C, 正确答案为（D）, 答案应该是A, 答案是选项A, **答案**：B
    r"答案(?:\**(?:应该|应)?(?:是|为|选))?" + LEAD + r"(?:选项" + LEAD + ")?" + LETTER + r"(?![)\]）*]*[ \t]*[?？吗])",
    # The answer is (B), Answer: C, **Answer:** D, the correct answer is: D, A good choice is C, my answer would be
    # option B; "choice" needs a verb or a colon before the letter ("Answer choice A is wrong" discusses an option);
    # not "the wrong answer is B", "Is the answer A?", nor the first of options listed below "To find the answer:"
    r"(?<![Ww]rong )(?<![Ii]ncorrect )(?<![Ff]alse )(?<![Bb]ad )"
    r"(?:(?i:answer)(?:[\s*]+(?i:" + VERB + r"))?|(?i:choice)(?:[\s*]+(?i:" + VERB + r")|(?=[\s*]*[:：])))"
    + LEAD + r"(?:(?i:option)" + LEAD + ")?" + LETTER + r"(?![)\]）*]*[ \t]*[?？吗])",
    # the correct option is C, the best option: (D), 正确选项为B, 正确的选项是C: a verb or a colon on the
    # same line, then the letter; not "to find the correct option:\nA. ...", "Is the correct option A?",
    # "正确选项是A吗", nor an option's text quoted after it ("the best option is: A decrease in ..."),
    # but "the correct option is A because ..." is A
    r"(?i:correct|right|best|final|true)[ \t]+(?i:option|letter)(?:[ \t]+here)?"
    r"(?:[ \t]+(?i:" + VERB + r")|(?=[ \t]*[:：]))[ \t:：*(\[（]*"
    r"(?!A[ \t]+(?!(?:because|since|as|and|for|which|given|so|but|rather|while|whereas|in|with|here|due|based"
    r"|instead|over|not|or|too|is|was|would)\b)[a-z])" + LETTER + r"(?![)\]）*]*[ \t]*[?？吗])",
    r"正确(?:的)?选项(?:应该|应)?(?:是|为|[:：])[ \t:：*(\[（]*" + LETTER + r"(?![)\]）*]*[ \t]*[?？吗])",
    # I choose B, I'd pick C, I would go with D
    r"(?i:\bI(?:'d|\s+would|\s+will)?\s+(?:choose|pick|select|go\s+with))" + LEAD + r"(?:(?i:option)" + LEAD + ")?"
    + LETTER,
    # B is correct, C is the right one, D is the answer, C是正确的, 选项D正确
    ALONE + r"([A-D])\s*(?:(?:是|为|is)\s*)?(?:the\s+)?(?:正确|correct|right|answer)",
    # an analysis of each option: "A. 正确，符合题意。B. 错误。..." (an option judged right by its label)
    ALONE + r"([A-D])[.．、:：]\s*正确",
    # 故选B, 应该选择C (but not "选项A": an option under discussion)
    r"选(?:择)?了?" + LEAD + LETTER,
    # last resort: the first letter standing alone ("B", "B. Paris", "(C)"), where "A" + a word is the
    # article, not asked about ("Is it B?"); not letters ruled out together ("A and B are wrong"; one said
    # not to be it, or one of a hedge, no pattern takes: see extract)
    ALONE + r"(?!A\s+[a-z])" + LETTER + r"(?![)\]）*]*[ \t]*[?？吗])" + RULED_OUT,  # not "Is it B?"
)]
# Letters no pattern may take, whatever it matched around them:
# - a hedge: letters joined by "or" or "/" ("A or B", "(A) or (B)", "A, B, or C", "A/B", "A或B"): no answer
#   given. Letters are joined when only one of these stands between them (brackets, bold and spaces aside);
#   "A/B testing" and "A/D conversion" are terms, not hedges.
# - several letters named together as the answer: said to be correct together ("Both A and C are correct",
#   "A and C both apply", "C、D都正确"), named as the answers ("The answers are A and C"), or given after an
#   answer keyword and ending the line ("Answer: A, B, C, D", "答案是B和C"). Any other list is an answer and
#   the letters it rules out ("The answer is B, and C and D are incorrect"); letters joined by "or" but ruled
#   out together ("C, A or B are wrong") are no hedge.
BARE_LETTER = re.compile(ALONE + LETTER)
LIST_JOINS = {",", "，", "、", "and", ",and", "和", "与", "以及"}
OR_JOINS = {"or", ",or", "，or", "/", "或", "或者", "、或"}
POSITIVE = r"(?:correct|right|true|valid|(?:the\s+)?(?:correct\s+)?answers?|apply|applies|hold|holds)\b"
ALL_CORRECT = re.compile(r"[)\]）*]*\s*(?:(?:(?:both|all)\s+)?(?:(?:are|were)\s+(?:both\s+|all\s+)?)?" + POSITIVE
                         + r"|[^.。;；\n]{0,24}?\b(?:both|all)\s+" + POSITIVE
                         + r"|(?:都|均)?(?:是)?(?:正确|对(?![比应于照])))", re.IGNORECASE)
ANSWERS_BEFORE = re.compile(r"(?i:answers)\s*(?:are|would be|:)?[\s*:：(\[（]*\Z")
RULED_OUT_AFTER = re.compile(r"[)\]）*]*(?:" + WRONG_TOGETHER + r"|\s*(?:错误|不对|不正确))", re.IGNORECASE)
LINE_END = re.compile(r"[)\]）*]*[ \t]*[.。!！]?[ \t]*(?:\n|\Z)")
KEYWORD_BEFORE = re.compile(r"(?:(?i:answers?|choices?|options?|choose|pick|select|go\s+with)|答案|选项|选)"
                            r"[^\nA-D]{0,16}\Z")
MAYBE = re.compile(r"possibly|perhaps|maybe|probably|也许|可能|或许")  # "B, or possibly C", "B或者可能C": still "or"
TERM = re.compile(r"\s?[a-z\u4e00-\u9fff]")  # what follows "A/B" in "A/B testing", "A/B测试"
# - a letter said not to be it: "not A", "Not (A)", "isn't **A**", "不是（A）", "can't be B", "would not choose
#   A", "neither A nor B", or the wrong one: "the wrong answer is B", "The incorrect choice: A", "错误的答案是B"
WRONG = re.compile(r"(?:(?i:wrong|incorrect|false|bad)[ \t]+(?i:answer|choice|option)[ \t]*(?i:is|would be|:)?"
                   r"|(?:错误|不正确|不对)的?(?:答案|选项)(?:应该|应)?(?:是|为)?[:：]?)[\s(\[（*]*\Z")
NEGATED = re.compile(r"(?:\bnot|n't|n’t|\bcannot|\bneither|\bnor|不是)(?:\s+(?:be|choose|pick|select))?[\s(\[（*]*\Z",
                     re.IGNORECASE)
# A reply that is only its answer ("B", "B. 7", "Answer: B", "答案：B") and then writes a question of its
# own in the exemplars' form (a blank line, then options A-D and an "Answer:" line: a base model carrying
# on a few-shot prompt) is read up to that question. A reply that says more before restated options is
# read whole: its own "Answer:" line then decides.
OPTIONS_THEN_ANSWER = re.compile(r"^[ \t]*A\.[^\n]*\n[ \t]*B\.[^\n]*\n[ \t]*C\.[^\n]*\n[ \t]*D\.[^\n]*\n\s*"
                                 r"\**(?:Answer|答案)\**[ \t]*[:：]", re.MULTILINE)
BARE_ANSWER = re.compile(r"\s*(?:(?i:the answer is|answer)[ \t]*[:：]?[ \t]*|答案[ \t]*[:：是为]?[ \t]*)?[(\[（*]*"
                         r"([A-D])(?![A-Za-z])[)\]）*]*(?:[.:：][^\n]{0,200})?\s*")
BLANK_LINE = re.compile(r"\n[ \t]*\n")


def hedges(reply: str) -> list[tuple[int, int]]:
    """The spans of letter groups that give no one answer: joined by a hedge (see OR_JOINS), or named
    together as the answer (see ALL_CORRECT, LINE_END, KEYWORD_BEFORE), in one linear pass."""
    out, letters = [], list(BARE_LETTER.finditer(reply))
    group, hedged = [], False

    def close():
        start, end = group[0].start(), group[-1].end()
        if len(group) < 2:
            return
        if hedged and not RULED_OUT_AFTER.match(reply, end):  # "C, A or B are wrong": ruled out, no hedge
            out.append((start, end))
        elif (ALL_CORRECT.match(reply, end) or ANSWERS_BEFORE.search(reply, max(0, start - 24), start)
              or LINE_END.match(reply, end) and KEYWORD_BEFORE.search(reply, max(0, start - 40), start)):
            out.append((start, end))
        elif RULED_OUT_AFTER.match(reply, end) and not KEYWORD_BEFORE.search(reply, max(0, start - 40), start):
            out.append((start, end))  # "A、C错误": a list ruled out (after an answer keyword, its first is the answer)
    for m in letters:
        if group:
            join = re.sub(r"[\s()\[\]（）*]", "", reply[group[-1].end():m.start()]).lower()
            term = join == "/" and TERM.match(reply, m.end())
            if MAYBE.sub("", join) in OR_JOINS:  # "or possibly" is still "or" (a maybe alone hedges nothing)
                join = MAYBE.sub("", join)
            if (join in LIST_JOINS or join in OR_JOINS) and not term:
                group.append(m)
                hedged |= join in OR_JOINS
                continue
            close()
        group, hedged = [m], False
    if group:
        close()
    return out


# Letters the last resort never takes: options restated (labels A, B, C, D in this order, "A. 1, B. 2, C. 3,
# D. 4" or one a line), their labels and the option texts between them; a list's last line is its last
# option. A reply that only echoes the options answers nothing (their first label, A, was taken); one that
# answers "A. Paris" and then explains B, C and D in turn looks the same, and reads as no answer too.
# A reply cut off at its token limit while listing options one a line ("Let's analyze each option:\n\nA. Live
# virus", the end) has restated them as far as it got (see cut_list).
LABEL = re.compile(r"(?<![A-Za-z])[(\[（]?([A-D])[.．:：)\]）](?=[ \t]*[^\s])")  # and its text: not "so D."


def restated(reply: str, cut: bool = False) -> list[tuple[int, int]]:
    """The spans of restated option lists (see LABEL), in one linear pass. cut: the reply hit its token
    limit (a list it was writing counts)."""
    out, run = [], []
    for m in LABEL.finditer(reply):
        if m.group(1) != LETTERS[len(run)]:
            run = [m] if m.group(1) == "A" else []
            continue
        run.append(m)
        if len(run) == len(LETTERS):
            end, line = m.end(), reply.rfind("\n", 0, m.start()) + 1
            if line and not reply[line:m.start()].strip():  # one a line: to the end of the last option's line
                nl = reply.find("\n", end)
                end = nl if nl >= 0 else len(reply)
            out.append((run[0].start(), end))
            run = []
    if cut and (span := cut_list(reply)):
        out.append(span)
    return out


ITEM = re.compile(r"[ \t*]*(?:(?:[-•·]|\d+[.)、])[ \t*]*)?")  # what may start a list item's line: "- ", "1. ", bold
LIST_INTRO = re.compile(r"(?i:\beach\b|\bevery\b|\boptions\b|\bchoices\b|analy[sz]|one by one)|逐一|每个|各个|各项|分析")


def cut_list(reply: str) -> tuple[int, int] | None:
    """The span of the options a reply cut off at its token limit was listing: labels in order from A, each
    starting its line, that no D completed — two or more, or A alone after a line that announces a list
    ("Let's analyze each option:", "分析每个选项。"). A label inside a line is no item; A alone after
    "The correct option is:" or at the reply's start may be its answer ("A. Paris, because")."""
    run = []
    for m in LABEL.finditer(reply):
        if not ITEM.fullmatch(reply, reply.rfind("\n", 0, m.start()) + 1, m.start()):
            continue
        run = run + [m] if m.group(1) == LETTERS[len(run)] else [m] if m.group(1) == "A" else []
        if len(run) == len(LETTERS):
            run = []  # complete: restated
    if not run:
        return None
    intro = reply[:reply.rfind("\n", 0, run[0].start()) + 1].rstrip().rstrip("*").rstrip()
    if len(run) > 1 or LIST_INTRO.search(intro[intro.rfind("\n") + 1:]):
        return run[0].start(), len(reply)  # to the cut: what follows an item is about the options
    return None


def starts_list(reply: str, at: int) -> bool:
    """The letter at `at` labels the first of options listed one a line (the next line starts with the next
    letter's label): "To find the answer:\nA. 1 is wrong\nB. 2 ..." names no answer."""
    if reply[at] == "D":
        return False
    nxt = LETTERS[LETTERS.index(reply[at]) + 1]
    return re.compile(r"[A-D][.．:：)][^\n]*\n[ \t]*[(\[（]?" + nxt + r"[.．:：)\]）]").match(reply, at) is not None


def extract(reply: str, cut: bool = False) -> str | None:
    """The option letter of a generated reply (see EXTRACTION), or None. cut: the reply hit its token
    limit (see restated)."""
    blanks = [m.start() for m in BLANK_LINE.finditer(reply)]
    for block in OPTIONS_THEN_ANSWER.finditer(reply):  # a question of its own after a bare answer: that answer
        k = bisect.bisect_left(blanks, block.start()) - 1  # the blank line before it
        if k >= 0 and (bare := BARE_ANSWER.fullmatch(reply, 0, blanks[k])):
            return bare.group(1)
    hedged, options = hedges(reply), restated(reply, cut)
    for pattern in EXTRACTION:
        for m in pattern.finditer(reply):
            at = m.start(1)
            if any(a <= at < b for a, b in hedged) or NEGATED.search(reply, max(0, at - 16), at) \
                    or WRONG.search(reply, max(0, at - 32), at):
                continue
            if pattern is EXTRACTION[-1] and any(a <= at < b for a, b in options):
                continue
            if "\n" in reply[m.start():at] and starts_list(reply, at):
                continue
            return m.group(1)
    return None


def score(ex, reply: str, cut: bool = False):
    pred = extract(reply, cut)
    return pred, pred == ex["answer"]
