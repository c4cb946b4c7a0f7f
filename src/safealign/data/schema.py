"""Record schemas: PKU-SafeRLHF preference pairs (docs/maths.md §1), SFT examples, prompts; and DataError.

Validation lives in `safealign.data.loading`; this module holds the types every stage shares and
must stay free of heavy imports (the CLI imports it for error handling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The 14 harm categories of the Safe RLHF paper (PKU-SafeRLHF-v0 / BeaverTails), spelled as in those
# datasets' JSON keys. SafeWorld uses these.
HARM_CATEGORIES: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)

# The 19 harm categories of PKU-SafeRLHF v1 (2024, arXiv 2406.15513), as spelled in its JSON keys.
PKU_SAFERLHF_V1_HARM_CATEGORIES: tuple[str, ...] = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)
# Keys a `response_{0,1}_harm_category` dict may use: either dataset's spelling.
KNOWN_HARM_CATEGORIES: frozenset[str] = frozenset(HARM_CATEGORIES) | frozenset(PKU_SAFERLHF_V1_HARM_CATEGORIES)

PromptKind = Literal["benign", "harmful", "borderline"]
PROMPT_KINDS: tuple[str, ...] = ("benign", "harmful", "borderline")
SEVERITY_LEVELS: tuple[int, ...] = (0, 1, 2, 3)  # 0 safe ... 3 severe


class DataError(ValueError):
    """Bad input data, located: `FILE: row N: field 'x': what is wrong`.

    `row` is 1-based (the line number in JSONL/CSV files, the index + 1 elsewhere); None when the
    problem is the file as a whole.
    """

    def __init__(self, file: str, message: str, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field, self.problem = str(file), row, field, message
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where) + ": " + message)


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A local data path that does not exist (also a FileNotFoundError, for callers that catch that)."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One PKU-SafeRLHF pair with decoupled helpfulness and harmlessness preferences."""

    prompt: str
    response_0: str
    response_1: str
    better_response_id: int  # 0 or 1: the more helpful response
    safer_response_id: int  # 0 or 1: the more harmless response
    is_response_0_safe: bool
    is_response_1_safe: bool
    response_0_harm_category: dict[str, bool] = field(default_factory=dict)
    response_1_harm_category: dict[str, bool] = field(default_factory=dict)
    response_0_severity_level: int | None = None  # 0 safe ... 3 severe
    response_1_severity_level: int | None = None
    extra: dict = field(default_factory=dict)  # sources, annotator ids, anything else the row had

    def response(self, index: int) -> str:
        return self.response_1 if index else self.response_0

    def is_safe(self, index: int) -> bool:
        return self.is_response_1_safe if index else self.is_response_0_safe

    @property
    def is_contradictory(self) -> bool:
        """The safer response is labelled unsafe while the other one is labelled safe."""
        return not self.is_safe(self.safer_response_id) and self.is_safe(1 - self.safer_response_id)


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    system: str | None = None  # system message of a chat-format row, if it had one


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    kind: PromptKind | None = None  # SafeWorld and red-team files say; user prompt files may not
    category: str | None = None  # harm category of a harmful prompt, if known
    extra: dict = field(default_factory=dict)
