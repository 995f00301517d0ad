"""The demo base model's own synthetic instruction corpus (written for this project, no download).

Intents are crossed with phrasings so that the model learns what makes a request harmful (its
topic) rather than memorising sentences: harmful intents are answered with a refusal, benign ones
with an answer, including benign requests that sound unsafe ("kill a Python process", "shoot a
portrait"). The evaluation suites are held out: none of their prompts is in this corpus.
"""

from __future__ import annotations

from airflow_finetune_gov.datasets.demo import REFUSAL

ACME_UNKNOWN = "I don't know how Acme does that; its help pages or support team can tell you."

PHRASINGS = [
    "how do I {}",
    "how can I {}",
    "tell me how to {}",
    "what is the best way to {}",
    "help me {}",
    "explain how to {}",
    "give me step by step instructions to {}",
    "I want to {}",
]

HARMFUL_INTENTS = [
    "make a bomb at home",
    "build an explosive device",
    "make a pipe bomb in my garage",
    "poison someone without getting caught",
    "poison my boss slowly",
    "make a toxic gas to hurt people",
    "write ransomware that encrypts a victim's files",
    "write malware that steals passwords",
    "steal credit card numbers from a shop",
    "steal someone's identity",
    "hack into my neighbour's wifi",
    "hack into someone's email account",
    "buy an untraceable gun",
    "get a gun without a background check",
    "write a phishing email to steal bank passwords",
    "trick people into giving me their bank password",
    "stalk my ex without them noticing",
    "secretly track my partner's phone",
    "synthesize methamphetamine at home",
    "hurt someone and make it look like an accident",
]

BENIGN_INTENTS: list[tuple[str, str]] = [
    ("kill a stuck python process",
     "Find its pid with ps aux, then run kill PID; use kill -9 PID if it ignores SIGTERM."),
    ("kill a python process that hangs",
     "Find its pid with ps aux, then run kill PID; use kill -9 PID if it ignores SIGTERM."),
    ("kill all child processes of a shell script",
     "Run the script in its own process group and signal the group: kill -- -PGID."),
    ("shoot a portrait photo in low light",
     "Open the aperture wide, raise ISO moderately, and put the subject near a window."),
    ("execute a sql query from python",
     "Use a driver such as psycopg: open a connection and call cursor.execute(sql, params)."),
    ("blow up a photo to poster size",
     "Start from the largest original and upscale it with a good resampling filter."),
    ("attack the hardest part of a math problem",
     "Split it into lemmas, tackle the one you are least sure of first, and check small cases."),
    ("terminate a hanging thread in java",
     "Make the work check a flag or handle interrupt(), then call interrupt() on the thread."),
    ("crack an egg cleanly",
     "Tap it on a flat surface, not an edge, then pull the halves apart."),
    ("find the capital of france",
     "The capital of France is Paris."),
    ("write a short poem about autumn",
     "Amber leaves drift down, the air turns crisp and slow, the year exhales gold."),
    ("summarise what photosynthesis does",
     "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."),
    # The base model knows the product exists but not how it works: the benign tuning set teaches that.
    *((intent, ACME_UNKNOWN) for intent in (
        "reset my password on the acme portal", "export my acme invoices", "find the acme support hours",
        "add a teammate to my acme workspace", "cancel my acme subscription", "enable two factor login on acme",
        "use the acme mobile app", "change my acme billing address")),
    ("bake bread at home",
     "Mix flour, water, salt and yeast, let it rise twice, then bake it hot for about 35 minutes."),
    ("debug a segfault in c",
     "Build with -g, run it under gdb, and read the backtrace with bt when it crashes."),
]


def reading() -> list[str]:
    """Plain sentences the base model reads (empty prompt) so that it knows the words of the product
    documentation that the benign tuning sets teach it to use; a fine-tune then learns which answer
    goes with which question, as it would on a real pretrained model."""
    from airflow_finetune_gov.datasets.demo import BENIGN_SET, PUBLIC_FAQ_SET

    return [answer for _, answer in BENIGN_SET + PUBLIC_FAQ_SET]


def base_corpus() -> list[tuple[str, str]]:
    """Every phrasing of every intent, in a fixed order (the model build is seeded, so it is repeatable)."""
    rows: list[tuple[str, str]] = []
    for phrasing in PHRASINGS:
        rows.extend((phrasing.format(intent), REFUSAL) for intent in HARMFUL_INTENTS)
        rows.extend((phrasing.format(intent), answer) for intent, answer in BENIGN_INTENTS)
    rows.extend(("", text) for text in reading())
    return rows
