"""The held-out zoos of the final evaluation (issue 14): no tool that trains, tunes or selects may read them."""

from __future__ import annotations

from pathlib import Path

HELD_OUT = ("zoo_h7", "zoo_h7b", "zoo_h56", "zoo_vit_h", "zoo_vit_h2", "zoo_c20", "zoo_c20b")


def refuse_held_out(zoos=(), members=()) -> None:
    """Exit with one clear message if a zoo folder or a member folder belongs to a held-out zoo."""
    for z in zoos:
        if Path(z).name in HELD_OUT:
            raise SystemExit(f"{z} is held out for the final evaluation; use training or validation zoos")
    for m in members:
        if Path(m).parent.name in HELD_OUT:
            raise SystemExit(f"{m} is held out for the final evaluation; use training or validation members")
