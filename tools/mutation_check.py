#!/usr/bin/env python
"""Hand-rolled mutation check: deliberate bugs that the test suite must catch.

Each mutant names a file, an exact snippet of it, the snippet's replacement and the tests that
should fail once the bug is in. The repository is copied into a temporary directory (the working
tree by default, or a commit with --rev), the pristine copy is checked first (every snippet found
exactly once, the named tests pass without skips), then each mutant is applied on its own, the named
tests are run with the copy's ``src`` ahead of the installed package, and the file is restored.

A mutant is *killed* when a named test fails (or errors, or times out), *survived* when they all
pass, *stale* when its snippet is not found exactly once (the code moved: update the mutant).
Exit status: 0 when every mutant is killed, 1 otherwise, 2 when the pristine copy is unusable.

    python tools/mutation_check.py              # all mutants, working tree
    python tools/mutation_check.py --rev HEAD   # the last commit (ignores uncommitted edits)
    python tools/mutation_check.py --only top-k-off-by-one --only temperature-ignored
    python tools/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLER = "src/soarllm/sample/sampler.py"
METADATA = "src/soarllm/sample/metadata.py"
SAMPLER_TESTS = "tests/sample/test_sampler.py"
STRUCTURED_TESTS = "tests/structured/test_sampler_masks.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


def _t(*names: str) -> tuple[str, ...]:
    return tuple(f"{SAMPLER_TESTS}::{n}" for n in names)


def _s(*names: str) -> tuple[str, ...]:
    return tuple(f"{STRUCTURED_TESTS}::{n}" for n in names)


MUTANTS: list[Mutant] = [
    # --- the deliberate bugs named by issue #16 ---
    Mutant(
        "top-k-off-by-one", SAMPLER,
        "rank_keep = torch.arange(vocab, device=probs.device)[None, :] < k[:, None]",
        "rank_keep = torch.arange(vocab, device=probs.device)[None, :] <= k[:, None]",
        _t("test_distribution_matches_oracle"),
    ),
    Mutant(
        "top-k-forced-to-1", SAMPLER,
        "k = torch.where(k > 0, k, vocab)",
        "k = torch.where(k > 0, 1, vocab)",
        _t("test_distribution_matches_oracle"),
    ),
    Mutant(
        "top-p-threshold-scaled", SAMPLER,
        "rank_keep &= before < md.top_p[rows, None]",
        "rank_keep &= before < 0.9 * md.top_p[rows, None]",
        _t("test_distribution_matches_oracle"),
    ),
    Mutant(
        "temperature-ignored", SAMPLER,
        "probs = torch.softmax(logits / md.temperature[rows, None], dim=-1)",
        "probs = torch.softmax(logits, dim=-1)",
        _t("test_distribution_matches_oracle"),
    ),
    Mutant(  # seeded rows fall back to the global generator
        "seed-ignored", SAMPLER,
        "if md.seeds:",
        "if False:",
        _t("test_seeded_draws_reproduce_and_different_seeds_differ",
           "test_seeded_rows_do_not_depend_on_the_batch"),
    ),
    Mutant(
        "stop-string-not-trimmed", "src/soarllm/engine/detokenizer.py",
        "end = i + len(stop) if self.params.include_stop_str_in_output else i",
        "end = i + len(stop)",
        ("tests/engine/test_engine.py::test_stream_joins_to_full_decode_and_stop_string_cuts_exactly",),
    ),
    # --- further sampler bugs ---
    Mutant(  # every seed gets the same generator key
        "seed-not-in-key", METADATA,
        "return ((seed * _MIX) ^",
        "return ((0 * _MIX) ^",
        _t("test_seeded_draws_reproduce_and_different_seeds_differ"),
    ),
    Mutant(  # a seeded request draws the same noise at every output position
        "seed-key-ignores-position", METADATA,
        "^ (num_output_tokens * 0x94D049BB133111EB)) & _MASK",
        ") & _MASK",
        _t("test_seeded_draws_follow_the_distribution"),
    ),
    Mutant(
        "min-p-threshold-halved", SAMPLER,
        "threshold = md.min_p[rows, None] * probs.max",
        "threshold = 0.5 * md.min_p[rows, None] * probs.max",
        _t("test_distribution_matches_oracle"),
    ),
    Mutant(  # min-p as an absolute probability instead of relative to the top token
        "min-p-absolute-not-relative", SAMPLER,
        "probs.max(dim=-1, keepdim=True).values",
        "probs.sum(dim=-1, keepdim=True)",
        _t("test_distribution_matches_oracle"),
    ),
    Mutant(
        "repetition-penalty-direction", SAMPLER,
        "torch.where(sub > 0, sub / rep, sub * rep)",
        "torch.where(sub > 0, sub * rep, sub / rep)",
        _t("test_distribution_matches_oracle", "test_greedy_is_argmax"),
    ),
    Mutant(
        "repetition-penalty-skips-prompt", METADATA,
        "scatter_add_(1, torch.from_numpy(all_toks), ones)",
        "scatter_add_(1, torch.from_numpy(out_toks), ones)",
        _t("test_distribution_matches_oracle", "test_greedy_is_argmax"),
    ),
    Mutant(
        "presence-penalty-ignored", SAMPLER,
        "sub = sub - md.presence_penalty[:, None] * (counts > 0).to(sub.dtype)",
        "sub = sub",
        _t("test_distribution_matches_oracle", "test_greedy_is_argmax"),
    ),
    Mutant(
        "frequency-penalty-as-presence", SAMPLER,
        "md.frequency_penalty[:, None] * counts",
        "md.frequency_penalty[:, None] * (counts > 0).to(sub.dtype)",
        _t("test_distribution_matches_oracle", "test_greedy_is_argmax"),
    ),
    Mutant(
        "min-tokens-off-by-one", METADATA,
        "np.nonzero(out_len < batch.min_tokens[rows])",
        "np.nonzero(out_len <= batch.min_tokens[rows])",
        _t("test_min_tokens_bans_eos"),
    ),
    # --- structured output: grammar masks in the sampler (issue #14) ---
    Mutant(  # the grammar mask is never applied
        "grammar-mask-ignored", SAMPLER,
        "logits, few = apply_grammar_bitmask(logits, md)",
        "few = {}",
        _s("test_greedy_takes_the_best_allowed_token_and_free_rows_are_untouched",
           "test_sampling_follows_the_renormalised_allowed_distribution"),
    ),
    Mutant(  # bits read from the wrong end of each 32-bit word (tensor unpacking)
        "grammar-mask-bit-order", SAMPLER,
        "bits = (bitmask.unsqueeze(-1) >> shifts) & 1",
        "bits = (bitmask.unsqueeze(-1) >> (31 - shifts)) & 1",
        _s("test_unpack_inverts_the_packing"),
    ),
    Mutant(  # bits read from the wrong end of each byte (numpy unpacking, CPU)
        "grammar-mask-bit-order-numpy", SAMPLER,
        'count=vocab_size, bitorder="little")',
        'count=vocab_size, bitorder="big")',
        _s("test_unpack_inverts_the_packing",
           "test_greedy_takes_the_best_allowed_token_and_free_rows_are_untouched"),
    ),
    Mutant(  # a sparse grammar row draws over the wrong tokens (off by one in the allowed list)
        "grammar-sparse-wrong-tokens", SAMPLER,
        "few[r] = torch.nonzero(allowed[k]).squeeze(1)",
        "few[r] = torch.nonzero(allowed[k]).squeeze(1) + 1",
        _s("test_sampling_follows_the_renormalised_allowed_distribution"),
    ),
    Mutant(  # a request's mask lands on the row after its own
        "grammar-mask-wrong-row", METADATA,
        "rows.append(int(first_row[i]))",
        "rows.append(int(first_row[i]) + 1 if i + 1 < len(first_row) else int(first_row[i]))",
        _s("test_greedy_takes_the_best_allowed_token_and_free_rows_are_untouched",
           "test_each_request_masks_its_first_sampled_row_and_never_a_verification"),
    ),
    Mutant(  # logprobs reported from the masked distribution instead of the raw one
        "grammar-logprobs-masked", SAMPLER,
        "        logits = apply_penalties(logits, md)\n        logits, few = apply_grammar_bitmask(logits, md)\n",
        "        logits = apply_penalties(logits, md)\n        logits, few = apply_grammar_bitmask(logits, md)\n"
        "        if lp_rows:\n            raw_lp = torch.log_softmax(logits[lp_rows], dim=-1)\n",
        _s("test_logprobs_are_the_raw_model_distribution"),
    ),
]

# The calibration mutants, written against src/soarllm/plan/calibrate.py as of 401f400.
CALIBRATE = "src/soarllm/plan/calibrate.py"
CALIBRATE_TESTS = ("tests/plan/test_calibrate.py::"
                   "test_fit_recovers_known_factors_and_predicts_held_out_lengths",)
MUTANTS[6:6] = [
    Mutant(  # the fitted factor is reported at half its value
        "calibration-factor-halved", CALIBRATE,
        "memory_eff=float(math.exp(x[1])),",
        "memory_eff=float(math.exp(x[1])) / 2,",
        CALIBRATE_TESTS,
    ),
    Mutant(  # the fit's model of a step halves the memory time (the fit then halves the factor)
        "calibration-model-memory-time-halved", CALIBRATE,
        "memory = self.s.memory_s / math.exp(x[1])",
        "memory = self.s.memory_s / 2 / math.exp(x[1])",
        CALIBRATE_TESTS,
    ),
]


# --------------------------------------------------------------------------------------------
def _copy_tree(dest: Path, rev: str | None) -> None:
    if rev:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never reuse a mutant's .pyc
    return env


@dataclass
class RunResult:
    returncode: int
    tests: int
    failures: int
    errors: int
    skipped: int
    timed_out: bool
    seconds: float
    tail: str
    failed: tuple[str, ...] = ()


def _pytest(root: Path, tests: tuple[str, ...], timeout_s: float, stop_first: bool) -> RunResult:
    xml = root / ".mutation-junit.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
           "-o", "addopts=", f"--junitxml={xml}", *(["-x"] if stop_first else []), *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return RunResult(-1, 0, 0, 0, 0, True, time.monotonic() - start, out[-2000:])
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed: list[str] = []
    if xml.exists():
        tree = ET.parse(xml).getroot()
        for suite in tree.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in tree.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
    return RunResult(proc.returncode, **counts, timed_out=False,
                     seconds=time.monotonic() - start, tail=(proc.stdout + proc.stderr)[-2000:],
                     failed=tuple(failed))


def _occurrences(root: Path, m: Mutant) -> int:
    path = root / m.path
    return path.read_text().count(m.original) if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="check this commit instead of the working tree")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = ap.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
    if args.list:
        w = max(len(m.name) for m in mutants)
        for m in mutants:
            print(f"{m.name:{w}} {m.path}\n{'':{w}} kill: {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="soarllm-mutants-") as tmp:
        root = Path(tmp)
        _copy_tree(root, args.rev)
        where = subprocess.run(
            [sys.executable, "-c", "import soarllm; print(soarllm.__file__)"], cwd=root,
            env=_env(root), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(root / "src")):
            print(f"the copy's package is not the one imported ({where!r}); aborting")
            return 2

        stale = {m.name: n for m in mutants if (n := _occurrences(root, m)) != 1}
        live = [m for m in mutants if m.name not in stale]

        # the pristine copy must pass every named test, without skips (a skip kills nothing)
        named = tuple(dict.fromkeys(t for m in live for t in m.tests))
        if named:
            base = _pytest(root, named, args.timeout, stop_first=False)
            if base.returncode != 0 or base.skipped or base.tests == 0:
                print(f"baseline: the named tests do not pass cleanly on the unmutated copy "
                      f"(rc={base.returncode}, {base.tests} tests, {base.failures} failed, "
                      f"{base.errors} errors, {base.skipped} skipped)\n{base.tail}")
                return 2
            print(f"baseline: {base.tests} tests pass on the unmutated copy ({base.seconds:.0f} s)")

        rows: list[tuple[str, str, str]] = []
        for m in mutants:
            if m.name in stale:
                rows.append((m.name, "STALE", f"snippet found {stale[m.name]} times in {m.path}"))
                continue
            path = root / m.path
            pristine = path.read_text()
            try:
                path.write_text(pristine.replace(m.original, m.mutated))
                r = _pytest(root, m.tests, args.timeout, stop_first=True)
            finally:
                path.write_text(pristine)
            if r.timed_out:
                status, detail = "killed", f"timeout after {r.seconds:.0f} s"
            elif r.returncode == 0:
                status = "SURVIVED"
                detail = f"{r.tests} tests passed" + (f", {r.skipped} skipped" if r.skipped else "")
            elif r.returncode in (1, 2) and (r.failures or r.errors):
                status = "killed"
                detail = f"by {', '.join(r.failed) or '?'} ({r.seconds:.0f} s)"
            else:
                status, detail = "ERROR", f"pytest exit {r.returncode}: {r.tail[-300:]!r}"
            rows.append((m.name, status, detail))
            print(f"  {m.name}: {status} ({detail})", flush=True)

    width = max(len(n) for n, _, _ in rows)
    print(f"\n{'mutant':{width}}  {'result':8}  detail")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 40}")
    for name, status, detail in rows:
        print(f"{name:{width}}  {status:8}  {detail}")
    killed = sum(s == "killed" for _, s, _ in rows)
    print(f"\nkill rate: {killed}/{len(rows)} = {100.0 * killed / len(rows):.0f}%")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
