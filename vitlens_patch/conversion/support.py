"""Which timm models convert to HookedViT: a support table built without weights.

    python -m vitlens_patch.conversion.support "vit_*" "deit*" "eva*"

Each model is built on the meta device (no memory, no download) and passed to
``config_from_timm``; the table says whether it converts or which feature stops it.
"""

from __future__ import annotations

import sys

import pandas as pd

from vitlens_patch.conversion.timm import config_from_timm


def timm_support_table(*patterns: str) -> pd.DataFrame:
    """One row per timm model matching ``patterns``: name, supported (bool), reason (str)."""
    import timm

    rows = []
    for name in sorted({name for pattern in patterns for name in timm.list_models(pattern)}):
        try:
            config_from_timm(timm.create_model(name, pretrained=False, device="meta"))
            rows.append(dict(model=name, supported=True, reason=""))
        except NotImplementedError as error:
            rows.append(dict(model=name, supported=False, reason=str(error)))
        except Exception as error:  # models timm itself cannot build on the meta device
            rows.append(dict(model=name, supported=False, reason=f"not built: {type(error).__name__}: {error}"))
    return pd.DataFrame(rows, columns=["model", "supported", "reason"])


def main(argv: list[str] | None = None) -> None:
    patterns = (argv if argv is not None else sys.argv[1:]) or ["vit_*", "deit*", "eva*"]
    table = timm_support_table(*patterns)
    for supported, group in table.groupby("supported", sort=False):
        print(f"\n{'converts' if supported else 'refused'}: {len(group)}")
        for row in group.itertuples():
            print(f"  {row.model}" + (f"  ({row.reason})" if row.reason else ""))


if __name__ == "__main__":
    main()
