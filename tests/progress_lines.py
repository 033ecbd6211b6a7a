"""What a successful job may print on stderr: its progress bars and nothing else (imported by tests)."""

from __future__ import annotations

import re

# One progress bar line as omniforge's tqdm bars draw them: "label: 100%|###| 12/12 [00:06<00:00, 1.73img/s]"
# or "plan: 12img [00:01,  7.17img/s]". Anything appended to it (Ray writes its log lines after a bar
# without a newline of their own) breaks the single bracket group at the end.
PROGRESS_LINE = re.compile(r"^(plan|label|tokenize): [^\[\]]*\[[^\[\]]*\]$")


def assert_only_progress_on_stderr(stderr: str) -> None:
    """stderr holds nothing but progress bar lines: no Ray log line (core_worker ... E, WARNING, (raylet)...)."""
    pieces = [p for p in re.split(r"[\r\n]", stderr) if p.strip()]
    assert pieces, "expected the progress bars on stderr"
    others = [p for p in pieces if not PROGRESS_LINE.match(p)]
    assert not others, others[:5]
    for word in ("core_worker", "ERROR", "WARNING", "Warning", "(raylet)"):
        assert word not in stderr, word
