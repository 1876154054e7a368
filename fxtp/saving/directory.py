"""The directory protocol `fxtp.save` and `fxtp.save_state` share: the ranks write into a
temporary directory beside the target and rank 0 renames it into place only once every rank
reported success through a timeout-guarded agreement step; a failure removes it. Nothing
half-written is ever left under the target's name.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import torch.distributed as dist
from torch import fx

from ..errors import FxtpError, NotTransformedError, SaveError
from ..rewrite.record import META_KEY
from ..runtime.agreement import gather_objects, resolve

SHOWN = 5


def transformed(tp: Any, what: str):
    """`tp`, its TPInfo and its process group (None at world size 1), when `tp` is the
    result of fxtp.transform."""
    if isinstance(tp, fx.GraphModule) and META_KEY in tp.meta:
        info = tp.meta[META_KEY]
        group = (resolve(info.group_name) if info.world_size > 1 and dist.is_initialized()
                 else None)
        return tp, info, group
    hint = (": a Generator's graph is its decode step; save the tp it was made from, or the "
            "model" if hasattr(tp, "load_weights") else "")
    raise NotTransformedError(f"{what} takes the result of fxtp.transform, not "
                              f"{type(tp).__name__}{hint}")


def target_path(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise SaveError(f"{what}: path must be a str or os.PathLike (a directory), got "
                        f"{type(path).__name__}")
    return os.path.abspath(os.fspath(path))


def check_target(path: str, overwrite: bool, what: str) -> None:
    """A file is never replaced; a non-empty directory only with overwrite=True."""
    if os.path.isfile(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise SaveError(f"{what}: {path} is a file, not a directory; choose another path")
    if os.path.isdir(path) and not overwrite:
        held = sorted(os.listdir(path))
        if held:
            raise SaveError(f"{what}: {path} is not empty (it holds "
                            f"{', '.join(held[:SHOWN])}{' ...' if len(held) > SHOWN else ''}); "
                            "choose an empty or new directory, or pass overwrite=True to "
                            "replace it as a whole. Nothing was written.")


def agree(status: dict, group, what: str) -> list[dict]:
    """Every rank's status (`ok`, `error`, ...), guarded; this rank's alone without a group."""
    return gather_objects(status, group, what) if group is not None else [status]


def raise_for_others(rows: list[dict], when: str, what: str, kind: type = SaveError) -> None:
    bad = [(r, row["error"]) for r, row in enumerate(rows) if not row["ok"]]
    if bad:
        r, error = bad[0]
        raise kind(f"{what}: rank {r} failed {when}: {error}")


def temporary_dir(path: str, token: str) -> str:
    """Beside `path`, hidden, and named as partial: never mistaken for the checkpoint."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.fxtp-partial-{token or 'local'}")


def begin(prepare: Callable[[], dict], group, what: str, kind: type = SaveError,
          when: str = "before writing anything") -> list[dict]:
    """Runs `prepare` (this rank's checks; returns the fields it shares), then agreement 1:
    every rank's status. Raises on every rank when any rank failed (its own error where it
    failed, a `SaveError` naming the failed rank elsewhere): nothing is written yet."""
    status: dict[str, Any] = {"ok": True, "error": ""}
    own = None
    try:
        status.update(prepare())
    except FxtpError as e:
        own = e
    except Exception as e:      # noqa: BLE001 - a library's failure: every rank must hear of it
        own = kind(f"{what}: {type(e).__name__}: {e}")
        own.__cause__ = e
    if own is not None:
        status.update(ok=False, error=f"{type(own).__name__}: {own}")
    rows = agree(status, group, f"the first agreement step of {what}")
    if own is not None:
        raise own
    raise_for_others(rows, when, what, kind)
    return rows


def finish(written: dict, rank: int, group, tmp: str, path: str, overwrite: bool,
           own_files: list[str], what: str) -> None:
    """Agreement 2 on every rank's `written` status (`ok`, `error`, `sizes` of its files),
    rank 0 publishing (or removing) the directory, agreement 3 on rank 0's result; raises on
    every rank unless all of it succeeded."""
    rows = agree(written, group, f"the second agreement step of {what}")
    final = {"ok": True, "error": ""}
    if rank == 0:
        final = publish(rows, tmp, path, overwrite, what)
    elif not all(r["ok"] for r in rows):
        remove_own(tmp, own_files)
    final_rows = agree(final, group, f"the last agreement step of {what}") if group else [final]
    if not written["ok"]:
        raise SaveError(written["error"])
    raise_for_others(rows, "while writing; nothing was saved at the path", what)
    if not final_rows[0]["ok"]:
        raise SaveError(final_rows[0]["error"] if rank == 0 else
                        f"{what}: rank 0 could not finish: {final_rows[0]['error']}")


def remove_own(tmp: str, names: list[str]) -> None:
    for name in names:
        try:
            os.remove(os.path.join(tmp, name))
        except OSError:
            pass


def publish(rows: list[dict], tmp: str, path: str, overwrite: bool, what: str) -> dict:
    """On rank 0 after agreement 2: the directory moved into place once rank 0 sees every
    rank's files at their sizes, or removed. Returns rank 0's status for agreement 3."""
    if not all(r["ok"] for r in rows):
        shutil.rmtree(tmp, ignore_errors=True)
        return {"ok": False, "error": "another rank failed"}
    try:
        for r, row in enumerate(rows):
            for name, size in row["sizes"].items():
                there = os.path.join(tmp, name)
                if not os.path.exists(there) or os.path.getsize(there) != size:
                    raise SaveError(
                        f"{what}: rank 0 does not see {name} as rank {r} wrote it in {tmp}: "
                        f"the path must be on a filesystem every rank sees (a shared or "
                        f"network filesystem across nodes). Nothing was saved at {path}.")
        move_into_place(tmp, path, overwrite, what)
    except (OSError, SaveError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(e) if isinstance(e, SaveError) else (
            f"{what}: could not move the checkpoint into {path}: {type(e).__name__}: {e}")
        return {"ok": False, "error": message}
    return {"ok": True, "error": ""}


def move_into_place(tmp: str, path: str, overwrite: bool, what: str) -> None:
    """`tmp` renamed to `path`; an old `path` (overwrite=True) moved aside first and removed
    after, or put back if the rename fails."""
    old = None
    if os.path.isdir(path):
        if os.listdir(path):
            if not overwrite:       # filled while the ranks were writing
                raise SaveError(f"{what}: {path} was filled by something else while the "
                                "ranks wrote; nothing was saved there")
            old = tmp.replace(".fxtp-partial-", ".fxtp-old-")
            os.rename(path, old)
        else:
            os.rmdir(path)
    try:
        os.rename(tmp, path)
    except OSError:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
