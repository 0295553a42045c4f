"""Numbers in prose cannot drift: every number in a notebook's markdown that looks measured is printed by a code cell
of the same notebook whose output nbval compares, or its sentence names its source.

What looks measured (markdown text only; code spans, fenced code, URLs and headings' section numbers are skipped):
  percentage    98.7%, 5 %, and both ends of a range of percentages: 98.9-99.1%, 99.03% (98.96-99.14)
  decimal       0.657, 2.30, and LaTeX's 4.7 \\cdot 10^{-4}; not a version (2.14.1) nor a reference (Section 3.1,
                Sec. 3.2, Appendix B.1, Eq. 4, Table 1, Figure 7, section 1.3, step 5)
  count         9 epochs (9-epoch), 3 times, 27× or 27x (a ratio: not 429 × 128, nor 28x28), 5.0 points, and
                durations: 144 s, 16 seconds, 24 min, 4 minutes, 2 hours
  approximate   ~1000, ≈ 500, \\approx 2.303, about / around / roughly / nearly / almost / some 5,400
A number may carry a scale: 86.6M, 85 million, 200k. Plain integers ("16 patches", "60,000 digits") are not checked.

Where a number may come from (the first that matches wins):
  1. The text output of a code cell of the same notebook whose output nbval compares: not marked NBVAL_IGNORE_OUTPUT
     (a comment line) or nbval-ignore-output (a cell tag), not skipped. nbval's sanitize patterns are applied first.
  2. A number written in the code of a cell nbval runs: a setting (``lr=0.01``) or a bound a cell asserts
     (``assert acc > 0.98``, which prose may give as 98% or "98 points"). Exactly that value; a percentage or a
     count of points only as such a fraction, a ratio ("3 times") never as a whole number.
  3. A notebook the sentence names ("notebook 07", "notebooks 02-04", ``07_training_on_mnist.ipynb``): its compared
     outputs and its code, as in 1 and 2.
  4. A measurement file the sentence names (``benchmarks/...``): every number in benchmarks/measured/*.json, and
     every value recorded in minutes also in seconds.
  5. A source the sentence names (``SOURCES``): the paper (its Table, Figure, Appendix or Section N.N), another paper
     ("et al."), the fbrynpk README, another project (torchvision, timm, ...): accepted as written. The blog is the
     exception: a sentence that names it may only give numbers the blog prints (``BLOG_NUMBERS``), so a number of our
     replay never passes for one of the blog's.

Matching: an output matches when it shows the number at the same or a finer precision and rounds to it. "98.7%"
matches 98.68%, 98.7 and the fraction 0.9868; "0.657" matches 0.6571 but not 0.66; "27×" matches 27.3. An
approximate integer is rounded at its last non-zero digit, but to two significant digits at least ("about 5,400"
matches 5,421; "~1000" matches 950 to 1,049). Signs are ignored ("lost 5.0 points" matches -5.0%). A count of epochs
must sit on an output (or code) line that says "epoch". Points are percentage points: "4.9 points" matches 0.049.

The same function, ``unsupported_numbers``, checks README.md and docs/*.md against benchmarks/measured/*.json and the
notebooks' outputs (``test_documents_numbers_come_from_measurements``): a figure with no committed measurement behind it
is not quoted; the page says it is not measured yet and which command measures it.

To check executed copies instead of the stored notebooks, put them (same file names) in a folder and run
``PROSE_NUMBERS_NOTEBOOKS=/that/folder pytest tests/test_prose_numbers.py``.
"""
from __future__ import annotations

import configparser
import io
import json
import os
import re
import tokenize
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from nbval.plugin import find_comment_markers, find_metadata_tags

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = Path(os.environ.get("PROSE_NUMBERS_NOTEBOOKS") or REPO / "notebooks")
MEASURED = REPO / "benchmarks" / "measured"
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
MAX_WORDS = 220  # "no markdown cell over about 200 words"

# The losses, epochs and sizes the blog prints (../shared/sources/blog-vit-on-mnist.txt): the only numbers a sentence
# that names the blog may give, unless a compared output of the notebook prints them too.
BLOG_NUMBERS = ("2.305 2.367 2.301 2.298 2.300 2.303 2.304 2.312 2.309 2.297 2.308 2.299 2.311 2.331 2.291 "
                "0 10 8 768 3").split()
BLOG = re.compile(r"\bblog\b|\bthe post\b", re.IGNORECASE)
SOURCES = re.compile(  # the paper's own references are capitalised; this repository's "section 4" is not a source
    r"\bTables? \d|\bFigures? \d|\bAppendix [A-E]\b|\bSection \d+\.\d|\bSec\. \d|— Section \d|"
    r"(?i:\bthe paper\b|\bpaper's\b|Dosovitskiy|\bet al\.|fbrynpk|torchvision|\btimm\b|vit-pytorch|lucidrains|"
    r"Annotated Transformer|harvardnlp|PyTorch(?:'s)? documentation|LeNet|LeCun|mrdbourke|Learn PyTorch)")
NAMED_NOTEBOOK = re.compile(r"\bnotebooks? (\d\d)(?:\s*[-–]\s*(\d\d))?|\b(\d\d)_\w+\.ipynb")
NAMED_MEASUREMENT = re.compile(r"benchmarks/")

# -- finding the numbers in prose --------------------------------------------------------------------------------------
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
SCALE = {"k": Decimal(1000), "M": Decimal(10) ** 6, "B": Decimal(10) ** 9, "thousand": Decimal(1000),
         "million": Decimal(10) ** 6, "billion": Decimal(10) ** 9}
AFTER_SCALE = re.compile(r"(?:(k|M|B)(?![A-Za-z0-9])|\s(thousand|million|billion)\b)")
AFTER_POWER = re.compile(r"\s*(?:\\cdot|\\times|·|×)\s*10\^\{?([-−]?\d+)\}?")
AFTER_PERCENT = re.compile(r"\s?(?:%|\\%)")
IN_A_PERCENT_RANGE_AFTER = re.compile(r"\s*[-–]\s*\d+(?:\.\d+)?\s?%")  # 98.9-99.1%: both are percentages
IN_A_PERCENT_RANGE_BEFORE = re.compile(r"%\s*\((?:\d+(?:\.\d+)?\s*[-–]\s*)?$")  # 99.03% (98.96-99.14)
AFTER_UNIT = re.compile(r"(?:\s|-)(epochs?|times|points?|seconds?|s|minutes?|min|hours?)\b(?!-)|\s?(×|x)(?![\w\d])"
                        r"(?!\s*\d)")
BEFORE_APPROX = re.compile(r"(?:~|≈|\\approx|\\sim|\babout|\baround|\broughly|\bnearly|\balmost|\bsome)\s*\$?\s*$",
                           re.IGNORECASE)
BEFORE_REFERENCE = re.compile(r"(?:\bSec(?:tion|s?\.)|§|\bAppendix|\bEqs?\.|\bEquations?|\bTables?|\bFig(?:ure)?s?\.?|"
                              r"\bsections?|\bsteps?|\bStep|\bpart|\bnotebooks?|\bExercises?|\bversions?|\bPython|"
                              r"\btorch(?:vision)?|\beinops|\bmatplotlib|\bCUDA|\bv)\s*$", re.IGNORECASE)
UNIT_NAMES = {"epoch": "epoch", "epochs": "epoch", "s": "duration", "second": "duration", "seconds": "duration",
              "min": "duration", "minute": "duration", "minutes": "duration", "hour": "duration", "hours": "duration",
              "point": "points", "points": "points", "times": "ratio", "×": "ratio", "x": "ratio"}
ON_A_LINE_THAT_SAYS = {"epoch": re.compile(r"epoch", re.IGNORECASE),
                       "duration": re.compile(r"\d\s?(?:s|sec|seconds?|min|minutes?|h|hours?)\b|\btook\b|minutes",
                                              re.IGNORECASE)}
ABBREVIATIONS = re.compile(r"\b(?:e\.g|i\.e|et al|Eqs?|Sec|Fig|vs|cf|approx|No)\.")


@dataclass(frozen=True)
class Quantity:
    """A number as written: its magnitude, the size of its last shown digit, and whether it was a percentage."""
    value: Decimal
    quantum: Decimal
    percent: bool = False


@dataclass
class Finding:
    """A number in prose that nothing backs: where it is, what it is, and the sentence around it."""
    where: str
    number: str
    sentence: str

    def __str__(self) -> str:
        return f"{self.where}: {self.number!r} in: {self.sentence}"


def _quantity(text: str, frac: str | None, scale: Decimal = Decimal(1), approximate: bool = False) -> Quantity:
    digits = text.replace(",", "")
    value = Decimal(digits + (frac or "")) * scale
    if frac:
        quantum = Decimal(1).scaleb(-len(frac) + 1) * scale  # frac includes the "."
    elif approximate:  # rounded at its last non-zero digit, to two significant digits at least
        stripped = digits.rstrip("0") or "0"
        zeros = len(digits) - len(stripped)
        zeros = min(zeros, max(len(digits) - 2, 0))
        quantum = Decimal(10) ** zeros * scale
    else:
        quantum = scale
    return Quantity(abs(value), quantum)


HIDDEN = 0xE000  # code spans, link targets, URLs and HTML become one private-use character each, without digits


@dataclass
class Prose:
    """A markdown cell's text with its code, links and URLs hidden (no number in them counts), and a way back."""
    text: str
    hidden: list[str]

    def restore(self, text: str) -> str:
        return "".join(self.hidden[ord(c) - HIDDEN] if HIDDEN <= ord(c) < HIDDEN + len(self.hidden) else c
                       for c in text)


def clean_markdown(text: str) -> Prose:
    """The prose of a markdown cell: fenced code dropped; code spans, link targets, URLs and HTML tags hidden; the
    section numbers of headings dropped."""
    hidden: list[str] = []

    def hide(match: re.Match) -> str:
        hidden.append(match.group(0))
        return chr(HIDDEN + len(hidden) - 1)

    text = re.sub(r"```.*?```", " ", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`|\]\([^)]*\)|https?://\S+|<[^>\n]+>", hide, text)
    text = re.sub(r"^(#+\s*)\d+(?:\.\d+)*\.?", r"\1", text, flags=re.MULTILINE)
    return Prose(text, hidden)


def sentences(prose: Prose) -> list[tuple[str, str, str]]:
    """(sentence, as written, context) triples: paragraphs, list items and table rows first, then sentences at . ! ?
    before a capital. The context is where a source may be named: the sentence itself, or a whole quotation (a quoted
    block ends with its attribution, "— Section 4.1"). The sentence keeps its code and links hidden; the other two
    have them back."""
    protected = ABBREVIATIONS.sub(lambda match: match.group(0).replace(".", "\0"), prose.text)
    blocks = re.split(r"\n\s*\n|\n(?=\s*(?:[-*+]|\d+\.)\s)|\n(?=\s*\|)|\n(?=#)", protected)
    result = []
    for block in blocks:
        quoted = block.lstrip().startswith(">")
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z*(\[$>\"“_`\ue000-\uf8ff])", block):
            sentence = " ".join(sentence.replace("\0", ".").split())
            if sentence:
                context = " ".join(block.replace("\0", ".").split()) if quoted else sentence
                result.append((sentence, prose.restore(sentence), prose.restore(context)))
    return result


@dataclass(frozen=True)
class ProseNumber:
    text: str
    quantity: Quantity
    kind: str  # "percent", "decimal", "unit", "approximate"
    unit: str = ""


def measured_looking(sentence: str) -> list[ProseNumber]:
    """The numbers of one sentence that look measured (see the module docstring)."""
    found = []
    for match in NUMBER.finditer(sentence):
        start, end = match.span()
        before, after = sentence[:start], sentence[end:]
        if before[-1:] and (before[-1].isalnum() or before[-1] in "_./\\^{"):
            continue  # inside a word, a path, a version or a LaTeX exponent
        if re.match(r"\.\d", after):
            continue  # a version: 2.14.1
        if re.match(r"[A-Za-z_]", after) and not AFTER_SCALE.match(after) and not AFTER_UNIT.match(after):
            continue  # part of an identifier: 3e-4, 5x5, vit_b_16
        if BEFORE_REFERENCE.search(before[-14:]):
            continue  # Section 3.1, Eq. 4, step 5, notebook 07, torch 2.14
        text = match.group(0)
        frac = text[text.index("."):] if "." in text else None
        integer = text.split(".")[0]
        scale_match = AFTER_SCALE.match(after)
        scale = SCALE[scale_match.group(1) or scale_match.group(2)] if scale_match else Decimal(1)
        rest = after[scale_match.end():] if scale_match else after
        approximate = bool(BEFORE_APPROX.search(before[-12:]))
        power = AFTER_POWER.match(rest)
        if power:
            scale *= Decimal(10) ** int(power.group(1).replace("−", "-"))
            rest = rest[power.end():]
        quantity = _quantity(integer, frac, scale, approximate)
        percent_range = IN_A_PERCENT_RANGE_AFTER.match(rest) or IN_A_PERCENT_RANGE_BEFORE.search(before)
        if AFTER_PERCENT.match(rest) or percent_range:
            found.append(ProseNumber(text, Quantity(quantity.value, quantity.quantum, True), "percent"))
        elif (unit := AFTER_UNIT.match(rest)) is not None and not (frac and unit.group(1) and
                                                                    unit.group(1).lower().startswith("epoch")):
            word = (unit.group(1) or unit.group(2)).lower()
            found.append(ProseNumber(text, quantity, "unit", UNIT_NAMES.get(word, word)))
        elif frac:
            found.append(ProseNumber(text, quantity, "decimal"))
        elif approximate:
            found.append(ProseNumber(text, quantity, "approximate"))
    return found


# -- the evidence ------------------------------------------------------------------------------------------------------
@dataclass
class Evidence:
    """What prose may quote: numbers shown somewhere (with the line they sit on) and numbers written in code."""
    shown: list[tuple[Quantity, str]] = field(default_factory=list)
    written: list[tuple[Decimal, str]] = field(default_factory=list)

    def __iadd__(self, other: Evidence) -> Evidence:
        self.shown += other.shown
        self.written += other.written
        return self


def shown_numbers(text: str) -> list[tuple[Quantity, str]]:
    """Every number in an output text, with its line: 98.68%, 0.9868, 4.7e-04, 86.6M, x2.9, 1,139,200."""
    numbers = []
    for line in text.splitlines():
        for match in re.finditer(r"(?<![A-Za-z0-9_.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?"
                                 r"(?:[eE]([-+]?\d+))?(%|[kMB](?![A-Za-z]))?", line):
            integer, frac, exponent, suffix = match.groups()
            scale = SCALE.get(suffix, Decimal(1)) if suffix and suffix != "%" else Decimal(1)
            if exponent:
                scale *= Decimal(10) ** int(exponent)
            quantity = _quantity(integer, frac, scale)
            numbers.append((Quantity(quantity.value, quantity.quantum, suffix == "%"), line))
        for match in re.finditer(r"(?<=[x×])(\d+)(\.\d+)?", line):  # x2.9, 5x5
            quantity = _quantity(match.group(1), match.group(2))
            numbers.append((quantity, line))
    return numbers


def _sanitize_patterns() -> list[tuple[re.Pattern, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SANITIZE)
    return [(re.compile(parser[section]["regex"]), parser[section]["replace"]) for section in parser.sections()]


SANITIZERS = _sanitize_patterns()


def _cell_options(cell: dict) -> dict:
    options = dict(find_metadata_tags(cell.get("metadata", {})))
    options.update(find_comment_markers("".join(cell["source"])))
    return options


def output_is_compared(cell: dict) -> bool:
    """nbval compares this code cell's outputs: not skipped, not marked to ignore its output."""
    options = _cell_options(cell)
    return not options.get("skip", False) and options.get("check", True) is not False


def _output_text(cell: dict) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append("".join(output.get("text", "")))
        for mime, data in output.get("data", {}).items():
            if mime.startswith("text/"):
                parts.append("".join(data) if isinstance(data, list) else data)
    text = "\n".join(parts)
    for pattern, replacement in SANITIZERS:
        text = pattern.sub(replacement, text)
    return text


def _code_literals(source: str) -> list[tuple[Decimal, str]]:
    """The number literals of a cell's code (not its comments or strings), each with its line."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    code, literals = "\n".join(lines) + "\n", []
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.NUMBER and not token.string.lower().endswith("j"):
                text = token.string.replace("_", "")
                try:
                    value = Decimal(text) if not text.lower().startswith(("0x", "0o", "0b")) else Decimal(int(text, 0))
                except ArithmeticError:
                    continue
                literals.append((abs(value), token.line))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return literals


def notebook_evidence(path: Path) -> Evidence:
    """The compared outputs and the code of one notebook."""
    evidence = Evidence()
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code" or _cell_options(cell).get("skip", False):
            continue
        evidence.written += _code_literals("".join(cell["source"]))
        if output_is_compared(cell):
            evidence.shown += shown_numbers(_output_text(cell))
    return evidence


def measured_evidence(folder: Path = MEASURED) -> Evidence:
    """Every number in the committed measurements, on a line naming its key; minutes also as seconds."""
    evidence = Evidence()

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            line = f"{key}: {value!r}"
            for quantity, _ in shown_numbers(repr(value)):
                evidence.shown.append((quantity, line))
                if "minutes" in key:
                    evidence.shown.append((Quantity(quantity.value * 60, quantity.quantum * 60), f"{line} (x 60 s)"))

    for path in sorted(folder.glob("*.json")):
        walk(json.loads(path.read_text()), path.stem)
    return evidence


# -- matching ----------------------------------------------------------------------------------------------------------
def _matches(number: ProseNumber, shown: Quantity) -> bool:
    """``shown`` displays ``number`` at the same or a finer precision and rounds to it (see the module docstring)."""
    target, quantum = number.quantity.value, number.quantity.quantum
    if number.kind == "percent":  # 98.7% <- 98.68% or the fraction 0.9868
        candidates = [(shown.value, shown.quantum)] if shown.percent else [(shown.value * 100, shown.quantum * 100)]
    elif number.unit == "points":  # percentage points: 4.9 points <- +4.9%, 0.049 or a plain 4.9
        candidates = [(shown.value, shown.quantum)] + ([] if shown.percent else [(shown.value * 100,
                                                                                   shown.quantum * 100)])
    else:
        candidates = [(shown.value, shown.quantum)] + ([(shown.value / 100, shown.quantum / 100)] if shown.percent
                                                       else [])
    if number.unit in ("points", "ratio") and not shown.percent:
        candidates = [(v, q) for v, q in candidates if q < 1]  # a bare integer such as a seed or a size is no ratio
    return any(q <= quantum and abs(v - target) * 2 <= quantum for v, q in candidates)


def _backed(number: ProseNumber, evidence: Evidence) -> bool:
    line_says = ON_A_LINE_THAT_SAYS.get(number.unit)

    def relevant(line: str) -> bool:
        return line_says is None or bool(line_says.search(line))

    if any(relevant(line) and _matches(number, quantity) for quantity, line in evidence.shown):
        return True
    if number.kind == "percent" or number.unit == "points":  # 98% <- assert accuracy > 0.98, never range(98)
        targets = {number.quantity.value / 100}
    else:
        targets = {number.quantity.value}
    integers_count = number.unit != "ratio"  # "3 times" is no range(3)
    return any(relevant(line) and value in targets and (integers_count or value != value.to_integral_value())
               for value, line in evidence.written)


def _blog_backed(number: ProseNumber) -> bool:
    return any(_matches(number, _quantity(text.split(".")[0], text[text.index("."):] if "." in text else None))
               for text in BLOG_NUMBERS)


def unsupported_numbers(text: str, evidence: Evidence, where: str, named_notebook=None,
                        named_measurements=None) -> list[Finding]:
    """The measured-looking numbers of ``text`` (markdown) that ``evidence`` does not show and no named source covers.

    ``named_notebook(number)`` returns the Evidence of a notebook a sentence names (or None), ``named_measurements()``
    that of benchmarks/measured; without them, naming a notebook or a measurement file adds nothing."""
    findings = []
    for sentence, written, context in sentences(clean_markdown(text)):
        numbers = [number for number in measured_looking(sentence) if not _backed(number, evidence)]
        if not numbers:
            continue
        extra = Evidence()
        if named_notebook is not None:
            for match in NAMED_NOTEBOOK.finditer(context):
                first, last, file = match.groups()
                start, stop = (int(file), int(file)) if file else (int(first), int(last or first))
                for index in range(start, stop + 1):
                    extra += named_notebook(index) or Evidence()
        if named_measurements is not None and NAMED_MEASUREMENT.search(context):
            extra += named_measurements()
        for number in numbers:
            if _backed(number, extra):
                continue
            if BLOG.search(context):
                if _blog_backed(number):
                    continue
            elif SOURCES.search(context):
                continue
            findings.append(Finding(where, number.text, written))
    return findings


# -- the tests ---------------------------------------------------------------------------------------------------------
def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


_EVIDENCE_CACHE: dict[Path, Evidence] = {}


def _evidence_of(path: Path) -> Evidence:
    if path not in _EVIDENCE_CACHE:
        _EVIDENCE_CACHE[path] = notebook_evidence(path)
    return _EVIDENCE_CACHE[path]


def _named_notebook(index: int) -> Evidence | None:
    paths = sorted(NOTEBOOKS.glob(f"{index:02d}_*.ipynb"))
    return _evidence_of(paths[0]) if paths else None


def notebook_findings(path: Path) -> list[Finding]:
    """Every unbacked number in one notebook's markdown, cell by cell."""
    evidence, findings = _evidence_of(path), []
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "markdown":
            findings += unsupported_numbers("".join(cell["source"]), evidence,
                                            f"{path.name}, markdown cell {index}", _named_notebook, measured_evidence)
    return findings


@pytest.mark.parametrize("path", _notebooks(), ids=lambda path: path.stem)
def test_every_number_in_a_notebooks_prose_is_printed_by_it_or_names_its_source(path):
    findings = notebook_findings(path)
    assert not findings, (f"{len(findings)} number(s) in the prose of {path.name} that no compared output of the "
                          "notebook prints and whose sentence names no source (see tests/test_prose_numbers.py):\n"
                          + "\n".join(f"  {finding}" for finding in findings))


def words(markdown: str) -> int:
    """Words as a reader counts them: a table's pipes and rules, or a lone dash, are none."""
    return sum(1 for token in markdown.split() if any(character.isalnum() for character in token))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda path: path.stem)
def test_no_markdown_cell_runs_over_about_200_words(path):
    long = [(index, words("".join(cell["source"])))
            for index, cell in enumerate(json.loads(path.read_text())["cells"]) if cell["cell_type"] == "markdown"
            and words("".join(cell["source"])) > MAX_WORDS]
    assert not long, f"{path.name}: markdown cells over {MAX_WORDS} words (cell, words): {long}; split them"


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", documents(), ids=lambda path: path.name)
def test_documents_numbers_come_from_measurements(path):
    evidence = measured_evidence()
    for notebook in _notebooks():
        evidence += _evidence_of(notebook)
    findings = unsupported_numbers(path.read_text(), evidence, path.relative_to(REPO).as_posix(), _named_notebook,
                                   measured_evidence)
    assert not findings, (f"{len(findings)} number(s) in {path.name} that neither benchmarks/measured/*.json nor a "
                          "notebook's compared output holds:\n" + "\n".join(f"  {finding}" for finding in findings))


# -- the rules themselves ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prose, shown, backed", [
    ("accuracy 98.7% after nine epochs.", "test 0.9868", True),
    ("accuracy 98.7% after nine epochs.", "test 98.68%", True),
    ("accuracy 98.7% after nine epochs.", "test 0.986", False),  # shown less precisely than written
    ("a loss of 0.657.", "loss 0.66", False),
    ("a loss of 0.657.", "loss 0.6571", True),
    ("it lost 5.0 points.", "{'CNN': '+4.9%'}", False),
    ("it lost 4.9 points.", "{'CNN': '+4.9%'}", True),
    ("it lost 4.9 points.", "drop 0.049", True),
    ("about 5,400 images.", "5421", True),
    ("the ~1000 hits.", "491 512", False),
    ("27× less gradient.", "ratio 27.31", True),
    ("trained for 9 epochs.", "lr 9", False),
    ("trained for 9 epochs.", "{'epochs': 9}", True),
    ("a difference of 4.7 \\cdot 10^{-4}.", "differs by up to 4.7e-04", True),
    ("ViT-B has 86.6M parameters.", "ours 86.6M", True),
    ("about 85 million parameters.", "85,054,464", True),
    ("99.03% (98.96-99.14) over seeds.", "mean 0.99033 min 0.9896 max 0.9914", True),
    ("99.03% (98.96-99.15) over seeds.", "mean 0.99033 min 0.9896 max 0.9914", False),
])
def test_a_prose_number_is_backed_only_by_an_output_that_rounds_to_it(prose, shown, backed):
    evidence = Evidence(shown=shown_numbers(shown))
    assert (unsupported_numbers(prose, evidence, "example") == []) is backed


def test_numbers_that_are_not_measurements_are_left_alone():
    prose = ("Section 3.1 of the paper; Eq. 4 and step 5; torch 2.14.1; 16 patches of 7x7 pixels; 28 × 28 digits; "
             "55,000 = 429 × 128 + 88; `lr=0.3` in code; see [here](https://example.org/v1.2).\n\n## 7.1 A heading")
    assert [number.text for sentence, _, _ in sentences(clean_markdown(prose)) for number in measured_looking(sentence)
            ] == []


def test_a_sentence_that_names_the_blog_may_only_give_the_blogs_numbers():
    assert unsupported_numbers("The blog's loss stayed at 2.30.", Evidence(), "example") == []
    assert len(unsupported_numbers("The blog's loss fell to 0.29.", Evidence(), "example")) == 1
    assert unsupported_numbers("The paper reports 88.55% (Table 2).", Evidence(), "example") == []


def test_ignored_and_skipped_cells_back_nothing_but_their_code_still_counts():
    def cell(source, output, tags=()):
        return {"cell_type": "code", "source": source, "metadata": {"tags": list(tags)},
                "outputs": [{"output_type": "stream", "name": "stdout", "text": output}]}

    assert output_is_compared(cell("print(1)", "1"))
    assert not output_is_compared(cell("# NBVAL_IGNORE_OUTPUT\nprint(1)", "1"))
    assert not output_is_compared(cell("print(1)", "1", tags=["nbval-ignore-output"]))
    assert not output_is_compared(cell("print(1)", "1", tags=["nbval-skip"]))
    assert [value for value, _ in _code_literals("assert accuracy > 0.98  # not 0.5\nx = 'not 0.7'")] == [
        Decimal("0.98")]
