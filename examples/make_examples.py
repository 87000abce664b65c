"""Write the example data files the README uses, from the built-in skills generator.

    python examples/make_examples.py        # rewrites examples/*.jsonl (deterministic)

my_chats.jsonl and more_chats.jsonl are training chats, heldout.jsonl comes from the
calibration split (never trained on), eval_questions.jsonl from the held-out split (never
trained or calibrated on; ``vesper eval --data`` grades the assistant's answer as the
reference), each line ``{"messages": [user, assistant]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vesper_sdk import skills

HERE = Path(__file__).resolve().parent
FILES = {
    "my_chats.jsonl": lambda: skills.generate(600, seed=1),
    "more_chats.jsonl": lambda: skills.generate(300, seed=2),
    "heldout.jsonl": lambda: skills.calibration(300, seed=3),
    "eval_questions.jsonl": lambda: [
        {"messages": [*msgs, {"role": "assistant", "content": answer}]}
        for _task, msgs, answer in skills.held_out_tasks(600, seed=7)],
}


def main() -> None:
    for name, make in FILES.items():
        lines = [json.dumps({"messages": chat["messages"]}, ensure_ascii=False) for chat in make()]
        (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote examples/{name} ({len(lines)} chats)")


if __name__ == "__main__":
    main()
