"""A Hypothesis state machine over folder edits, re-index runs and crashes.

Rules change the folder (add, modify, delete, rename, caption edit, duplicate) and run the indexer in a
fresh process (forked from the zygote of test_crash.py), either to the end or SIGKILLed part way.
Invariants, checked by a fresh reader after every run: SQLite is whole, FAISS ids == live SQLite rows,
every hit maps to a live row; after a completed run the catalog equals the folder (paths, contents,
captions) and every hit maps to a file that exists.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.test_crash import Zygote, check_matches_folder, check_whole

pytestmark = pytest.mark.slow  # Hypothesis explores many index states

_zygote: Zygote | None = None


def zygote() -> Zygote:
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote()
    return _zygote


def teardown_module() -> None:
    if _zygote is not None:
        _zygote.close()


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mmsearch-sm-"))
        self.media, self.index, self.out = self.tmp / "media", self.tmp / "idx", self.tmp / "job"
        self.media.mkdir()
        self.names: list[str] = []  # image stems, relative to media
        self.serial = 0
        self.created = False
        self.complete = False  # the last run finished and the folder is unchanged since
        self.ran = False  # a run happened since the last check

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- folder edits ----------------------------------------------------------------------------
    def _write_image(self, stem: str, seed: int) -> None:
        self.serial += 1
        arr = np.random.default_rng([seed, self.serial]).integers(0, 256, (8, 10, 3), dtype=np.uint8)
        from PIL import Image

        path = self.media / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "RGB").save(path)
        st_ = path.stat()  # a new mtime even within the filesystem's timestamp granularity
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + self.serial * 1000))

    @rule(
        sub=st.sampled_from(["", "a/", "a/b/", "ü ñ/"]),
        captions=st.lists(st.sampled_from(["a dog", "a cat", "snow", "a dog"]), max_size=2),
        seed=st.integers(0, 10**6),
    )
    def add(self, sub: str, captions: list[str], seed: int) -> None:
        self.complete = False
        stem = f"{sub}img{self.serial}"
        self._write_image(stem, seed)
        if captions:
            (self.media / f"{stem}.txt").write_text("\n".join(captions))
        self.names.append(stem)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), seed=st.integers(0, 10**6))
    def modify(self, data: st.DataObject, seed: int) -> None:
        self.complete = False
        self._write_image(data.draw(st.sampled_from(self.names)), seed)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.complete = False
        stem = data.draw(st.sampled_from(self.names))
        self.names.remove(stem)
        (self.media / f"{stem}.png").unlink()
        (self.media / f"{stem}.txt").unlink(missing_ok=True)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), to_sub=st.sampled_from(["", "a/", "moved/"]))
    def rename(self, data: st.DataObject, to_sub: str) -> None:
        self.complete = False
        stem = data.draw(st.sampled_from(self.names))
        new = f"{to_sub}renamed{self.serial}"
        self.serial += 1
        (self.media / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.media / f"{stem}.png", self.media / f"{new}.png")
        if (self.media / f"{stem}.txt").exists():
            os.rename(self.media / f"{stem}.txt", self.media / f"{new}.txt")
        self.names[self.names.index(stem)] = new

    @precondition(lambda self: self.names)
    @rule(data=st.data(), text=st.sampled_from(["", "edited", "a dog\nsnow", "a cat"]))
    def edit_caption(self, data: st.DataObject, text: str) -> None:
        self.complete = False
        (self.media / f"{data.draw(st.sampled_from(self.names))}.txt").write_text(text)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.complete = False
        stem = data.draw(st.sampled_from(self.names))
        new = f"copy{self.serial}"
        self.serial += 1
        shutil.copy2(self.media / f"{stem}.png", self.media / f"{new}.png")
        self.names.append(new)

    # --- runs in a fresh process -----------------------------------------------------------------
    def _start(self) -> object:
        job = zygote().start(
            kind="index",
            index=str(self.index),
            folder=str(self.media),
            out=str(self.out),
            create=not self.created,
        )
        return job

    @rule()
    def reindex(self) -> None:
        job = self._start()
        assert job.wait() == 0, job.file(".stderr")  # type: ignore[attr-defined]
        self.created = self.complete = self.ran = True

    @precondition(lambda self: self.created)
    @rule(delay=st.floats(0.0, 1.5), seed=st.integers(0, 2**32 - 1))
    def crash_and_reopen(self, delay: float, seed: int) -> None:
        """A run killed with SIGKILL part way (or finished, if it was quicker than the delay)."""
        job = self._start()
        time.sleep(delay * random.Random(seed).random())
        job.kill(signal.SIGKILL)  # type: ignore[attr-defined]
        rc = job.wait()  # type: ignore[attr-defined]
        assert rc in (0, -signal.SIGKILL), job.file(".stderr")  # type: ignore[attr-defined]
        self.complete, self.ran = rc == 0, True

    # --- invariants ------------------------------------------------------------------------------
    @invariant()
    def index_is_whole(self) -> None:
        if not self.ran:
            return  # only runs change the index
        self.ran = False
        check_whole(self.index)  # integrity, no duplicates, FAISS ids == live rows (fresh reader)
        if self.complete:
            check_matches_folder(self.index, self.media)  # also: every hit maps to an existing file


IndexMachine.TestCase.settings = settings(
    max_examples=5,
    stateful_step_count=12,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TestIndexMachine = IndexMachine.TestCase
