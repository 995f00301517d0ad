"""Training-data screening: which rows of a dataset teach the base model to answer what it refuses today
(pure logic; the policy check supplies the rows, the base model and the detector).

A row is *flagged* when the detector says the base model refuses the row's prompt and the row's own
response does not refuse it: a harmful request answered compliantly, the handful of rows that undid
GPT-3.5's safety (Qi et al. 2023). The base model is the judge of what is harmful because it is the model
the fine-tune changes: a row is flagged exactly when it would teach that model the opposite of what it does.

What is recorded is counts and row ids, never row text (lineage is kept for years and read by auditors);
the approval request reads the few flagged rows it shows through its own lease.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_finetune_gov.evaluation.harness import Detector

# Row ids kept in lineage: every flagged one up to this many (the count is always exact)
MAX_RECORDED_IDS = 1000
METHOD = "refusal-flip/v1"


@dataclass
class ScreeningResult:
    """What the screening found: ``status`` is ``screened``, ``unavailable`` (with ``reason``) or ``disabled``."""

    status: str
    rows: int = 0  # in the dataset
    screened: int = 0  # rows looked at (all of them, or an even sample of max_rows)
    flagged_ids: list[int] = field(default_factory=list)
    base_refused: int = 0  # screened prompts the base model refuses (the harmful requests, as it sees them)
    detector: str = ""
    base: dict[str, Any] | None = None  # name, version, sha256 of the base model that answered
    reason: str = ""

    @property
    def flagged(self) -> int:
        return len(self.flagged_ids)

    @property
    def flagged_share(self) -> float:
        return round(self.flagged / self.screened, 4) if self.screened else 0.0

    def summary(self) -> str:
        """One line for the decision's reasons and the approval request."""
        if self.status != "screened":
            return f"training data not screened: {self.reason}"
        if not self.flagged:
            return f"screening: none of {self.screened} rows answers a request the base model refuses"
        base = (self.base or {}).get("name", "the base model")
        return (f"screening flagged {self.flagged} of {self.screened} rows ({self.flagged_share:.0%}): they answer "
                f"requests {base} refuses ({self.detector})")

    def facts(self) -> dict[str, Any]:
        """The facts the policy's rules match (``screening``, ``flagged_rows``, ``flagged_share``)."""
        counted = self.status == "screened"
        return {"status": self.status, "flagged_rows": self.flagged if counted else None,
                "flagged_share": self.flagged_share if counted else None,
                "summary": self.summary() if self.status != "disabled" else ""}

    def to_dict(self) -> dict[str, Any]:
        """The lineage record: counts and ids, never text."""
        return {"status": self.status, "method": METHOD, "rows": self.rows, "screened": self.screened,
                "flagged": self.flagged, "flagged_share": self.flagged_share,
                "flagged_ids": self.flagged_ids[:MAX_RECORDED_IDS], "base_refused": self.base_refused,
                "detector": self.detector, "base": self.base, "reason": self.reason}


def even_sample(rows: Sequence[Any], limit: int) -> list[Any]:
    """All rows, or ``limit`` of them evenly spread over the table (deterministic: the same rows every time)."""
    if len(rows) <= limit:
        return list(rows)
    return [rows[i * len(rows) // limit] for i in range(limit)]


def screen(rows: Sequence[tuple[int, str, str]], answer: Callable[[list[str]], list[str]], detector: Detector, *,
           max_rows: int = 5000, batch_size: int = 64, base: dict[str, Any] | None = None) -> ScreeningResult:
    """Screen ``rows`` (id, prompt, response): ``answer`` is the base model (prompts -> answers)."""
    picked = even_sample(rows, max_rows)
    flagged: list[int] = []
    base_refused = 0
    for start in range(0, len(picked), batch_size):
        chunk = picked[start:start + batch_size]
        prompts = [prompt for _, prompt, _ in chunk]
        answers = answer(prompts)
        if len(answers) != len(prompts):
            raise ValueError(f"the base model gave {len(answers)} answers to {len(prompts)} prompts")
        refuses = detector.refused(prompts, answers)
        complies = [not r for r in detector.refused(prompts, [response for _, _, response in chunk])]
        base_refused += sum(refuses)
        flagged += [row_id for (row_id, _, _), r, c in zip(chunk, refuses, complies, strict=True) if r and c]
    return ScreeningResult(status="screened", rows=len(rows), screened=len(picked), flagged_ids=flagged,
                           base_refused=base_refused, detector=detector.name, base=base)
