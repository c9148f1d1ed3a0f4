"""`asyncrunner plan`: the counts `run` would load, tokens, time and cost; nothing written."""

from __future__ import annotations

import io
import math
import re
import socket
import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    FIXTURE_ROWS,
    cli_env,
    experiment_id_from,
    run_cli,
    write_config,
    write_fixture_csv,
)

from asyncrunner.config import Config, load_config
from asyncrunner.errors import EndpointCannotServe, InputError, UsageError
from asyncrunner.estimate import (
    ProbeStats,
    Workload,
    client_settings,
    estimate,
    make_plan,
    nearest_rank,
    plan_command,
    prompt_chars,
    render,
)
from asyncrunner.llm.client import LLMClient
from asyncrunner.llm.throttle import AdaptiveLimiter

# The fixture (9 narratives, 1 blank) plus every kind of slot ingest does not keep.
ROWS = [
    *FIXTURE_ROWS,
    ("106", "N/A", "   ", "", "", ""),                                  # placeholder, blank
    ("00101", "Her boyfriend was arrested again.", "Decedent found at home.",
     "1", "0", "yes"),                                                  # 2 duplicates
    ("", "A narrative without an id.", "Another one.", "0", "0", "0"),  # 2 without an id
    ("107", "Neighbours heard shouting before the fire.", "-", "0", "", "0"),  # placeholder
]
KEPT = 10
PROMPT = {"system_prompt": "Classify.", "user_template": "N: <<TEXT>>"}


def _kept_texts() -> list[str]:
    """The narratives ingest keeps, by hand: first of each (id, type), not blank."""
    texts = [t for row in FIXTURE_ROWS for t in row[1:3] if t]
    return [*texts, "Neighbours heard shouting before the fire."]


def _config(tmp_path: Path, *, model: dict[str, Any] | None = None,
            prompt: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
            api_url: str = "http://127.0.0.1:9/v1", **run: Any) -> Path:
    csv_path = write_fixture_csv(tmp_path / "narr.csv", ROWS)
    path = write_config(tmp_path, csv_path, api_url, model=model, **run)
    raw = yaml.safe_load(path.read_text())
    raw["prompt"] = prompt or PROMPT
    raw["data"] |= data or {}
    path.write_text(yaml.safe_dump(raw))
    return path


def _load(path: Path, **overrides: Any) -> Config:
    return load_config(path, overrides=overrides, env={})


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- counts


def _run_total(tmp_path: Path, cfg: Path) -> int:
    db = tmp_path / "run.db"
    proc = run_cli("run", str(cfg), "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    eid = experiment_id_from(proc.stdout)
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT n_narratives_total FROM experiments WHERE experiment_id = ?",
                           (eid,)).fetchone()
    return int(row[0])


def test_counts_equal_what_run_loads(tmp_path: Path) -> None:
    limited = _config(tmp_path, model={"provider": "mock"}, max_narratives=7,
                      data={"sample": {"n": 4, "stratify": ["narrative_type"], "seed": 3}})
    limited = limited.rename(tmp_path / "limited.yaml")
    full = _config(tmp_path, model={"provider": "mock"})

    plan = make_plan(_load(full), probe=None, env={})
    w = plan.workload
    assert (w.n_rows, w.n_in_file, w.n) == (len(ROWS), KEPT, KEPT)
    assert (w.n_blank, w.n_placeholder, w.n_duplicates, w.n_no_id) == (4, 2, 2, 2)
    assert w.n == _run_total(tmp_path, full)

    sampled = make_plan(_load(limited), probe=None, env={}).workload
    assert (sampled.n_after_limit, sampled.n) == (7, 4)
    assert sampled.n == _run_total(tmp_path, limited)


def test_sample_and_max_narratives_are_honoured(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert make_plan(_load(cfg, **{"run.max_narratives": 4}), probe=None,
                     env={}).workload.n == 4
    big = _config(tmp_path, data={"sample": {"n": 1000}})
    w = make_plan(_load(big), probe=None, env={}).workload
    assert (w.n_after_limit, w.n) == (KEPT, KEPT)          # min(n, total)
    both = _config(tmp_path, data={"sample": {"n": 2, "stratify": "narrative_type"}},
                   max_narratives=5)
    w = make_plan(_load(both), probe=None, env={}).workload
    assert (w.n_after_limit, w.n) == (5, 2)
    out = io.StringIO()
    plan_command(str(both), probe=None, overrides={}, env={}, out=out)
    text = out.getvalue()
    assert "max_narratives:" in text and "sample:" in text
    assert re.search(r"^narratives to send: +2$", text, re.M)


def test_no_narratives_left_is_an_input_error(tmp_path: Path) -> None:
    csv_path = write_fixture_csv(tmp_path / "blank.csv", [("1", "", "N/A", "", "", "")])
    cfg = write_config(tmp_path, csv_path, "http://127.0.0.1:9/v1")
    with pytest.raises(InputError, match="no narratives"):
        make_plan(_load(cfg), probe=None, env={})


# --------------------------------------------------------------------------- tokens, cost


def test_prompt_chars_match_the_request_the_client_builds(tmp_path: Path) -> None:
    for role in ("system", "user"):
        cfg = _load(_config(tmp_path, prompt={**PROMPT, "system_role": role}))
        settings = replace(client_settings(cfg, {}), response_format=None)
        client = LLMClient(settings, http=None, limiter=AdaptiveLimiter(1))
        text = "Her boyfriend was arrested."
        body = client.build_body(cfg.prompt.system_prompt,
                                 cfg.prompt.user_template.replace("<<TEXT>>", text))
        assert prompt_chars(cfg, text) == sum(len(m["content"]) for m in body["messages"])


def test_cost_is_computed_exactly_for_set_prices(tmp_path: Path) -> None:
    path = _config(tmp_path, model={"max_tokens": 100,
                                    "price_per_mtok": {"input": 2.5, "output": 10},
                                    "price_per_1k_input": 0.001,
                                    "price_per_1k_output": 0.004})
    cfg = _load(path)
    plan = make_plan(cfg, probe=None, env={})
    chars = sum(len("Classify.") + len("N: ") + len(t) for t in _kept_texts())
    assert plan.workload.prompt_chars == chars
    tokens_in, tokens_out = math.ceil(chars / 4), 100 * KEPT
    est = plan.estimate
    assert (est.input_tokens, est.output_tokens) == (tokens_in, tokens_out)
    mtok, per_1k = est.costs
    assert mtok.source == "price_per_mtok"
    assert mtok.input_cost == pytest.approx(tokens_in * 2.5 / 1e6, rel=1e-12)
    assert mtok.output_cost == pytest.approx(tokens_out * 10 / 1e6, rel=1e-12)
    assert per_1k.total == pytest.approx(tokens_in / 1000 * 0.001 + tokens_out / 1000 * 0.004,
                                         rel=1e-12)
    out = io.StringIO()
    assert plan_command(str(path), probe=None, overrides={}, env={}, out=out) == 0
    text = out.getvalue()
    assert re.search(rf"^cost \(price_per_mtok\): +{mtok.total:.4f} = ", text, re.M)
    assert re.search(rf"^prompt tokens \(estimate\): +~{tokens_in:,} at ~4 characters a token",
                     text, re.M)
    assert "upper bound" in text
    assert re.search(r"^latency: +unknown \(measure it with --probe 20\)", text, re.M)
    assert re.search(r"^wall time: +unknown", text, re.M)


def test_no_price_says_how_to_set_one(tmp_path: Path) -> None:
    out = io.StringIO()
    plan_command(str(_config(tmp_path)), probe=None, overrides={}, env={}, out=out)
    assert re.search(r"^cost: +no price set \(model.price_per_mtok", out.getvalue(), re.M)


def test_a_75_hour_run_reads_in_hours() -> None:
    """The production figures: 41,892 narratives at 6.5 s each, 4 workers."""
    cfg = Config()
    work = Workload("data.xlsx", 20_946, 41_892, 0, 0, 0, 0, 41_892, 41_892, 41_892 * 2000)
    probed = ProbeStats(3, (6.4, 6.5, 7.0), (150, 150, 150), ((2000, 500),) * 3, (), "none")
    est = estimate(cfg, work, probed)
    assert est.wall_s == pytest.approx(41_892 * 6.5 / 4)
    assert est.sequential_s == pytest.approx(41_892 * 6.5)
    assert (est.input_tokens, est.output_tokens) == (41_892 * 500, 41_892 * 150)
    text = "\n".join(render(cfg, work, est, probed))
    assert "~18h 54m (18.9 hours) at 4 workers" in text
    assert "~75h 38m (75.6 hours) (n x median latency" in text
    assert "median 6.50 s, p90 7.00 s" in text


def test_nearest_rank() -> None:
    assert nearest_rank([], 0.9) is None
    assert nearest_rank([3.0], 0.9) == 3.0
    assert nearest_rank([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert nearest_rank([float(i) for i in range(1, 21)], 0.9) == 18.0


# --------------------------------------------------------------------------- the probe


def test_probe_measures_latency_and_wall_time(tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(latency_ms=50)
    path = _config(tmp_path, api_url=server.url, workers=4)
    out = io.StringIO()
    assert plan_command(str(path), probe=5, overrides={}, env={}, out=out) == 0
    plan = make_plan(_load(path), probe=5, env={})
    probed, est = plan.probe, plan.estimate
    assert probed is not None and probed.answered == 5 and not probed.failures
    assert probed.median_s is not None and probed.p90_s is not None
    assert 0.045 <= probed.median_s <= 0.3
    assert probed.p90_s >= probed.median_s
    assert est.wall_s == pytest.approx(KEPT * probed.median_s / 4)
    assert est.sequential_s == pytest.approx(KEPT * probed.median_s)
    assert probed.mean_completion_tokens is not None
    assert est.output_tokens == round(probed.mean_completion_tokens * KEPT)
    # two plans: 5 narratives + 1 response-format check each
    assert server.stats().completion_requests == 12
    text = out.getvalue()
    median_ms = float(re.search(r"^latency: +median ([\d.]+) ms", text, re.M).group(1))
    wall = float(re.search(r"^wall time: +~([\d.]+) s at 4 workers", text, re.M).group(1))
    assert 45 <= median_ms <= 300
    assert wall == pytest.approx(KEPT * median_ms / 1000 / 4, abs=0.011)
    assert "nothing stored" in text and "output tokens (measured):" in text


def test_probe_refused_by_the_endpoint_is_one_error(tmp_path: Path,
                                                     server_factory: Any) -> None:
    server = server_factory(fail_status=401)
    out = io.StringIO()
    with pytest.raises(EndpointCannotServe, match="API key"):
        plan_command(str(_config(tmp_path, api_url=server.url)), probe=3, overrides={},
                     env={}, out=out)
    assert "narratives to send:" in out.getvalue()      # the counts came first


def test_probe_without_any_answer_reports_then_fails(tmp_path: Path) -> None:
    path = _config(tmp_path, api_url=f"http://127.0.0.1:{_free_port()}/v1", max_attempts=1)
    out = io.StringIO()
    with pytest.raises(EndpointCannotServe, match="none of the probe's 2 requests"):
        plan_command(str(path), probe=2, overrides={}, env={}, out=out)
    text = out.getvalue()
    assert "0 answered, 2 failed" in text and "probe failure:" in text
    assert re.search(r"^latency: +unknown \(the probe got no answer\)", text, re.M)


def test_probe_is_refused_for_the_batch_provider(tmp_path: Path) -> None:
    cfg = _load(_config(tmp_path, model={"provider": "openai-batch"}))
    with pytest.raises(UsageError, match="Batch API"):
        make_plan(cfg, probe=2, env={})


# --------------------------------------------------------------------------- nothing written


def test_plan_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, model={"provider": "mock"})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["file"] = "narr.csv"                         # relative, as operators write it
    raw["run"] |= {"output_dir": "benchmark_results", "log_dir": "logs/experiments"}
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    out = io.StringIO()
    assert plan_command("cfg.yaml", probe=2, overrides={"run.workers": 8}, env={}, out=out) == 0
    assert _tree(tmp_path) == before
    assert "8 (run.workers)" in out.getvalue()


def test_cli_plan_with_probe_and_a_bad_config(tmp_path: Path) -> None:
    path = _config(tmp_path, model={"provider": "mock"})
    before = _tree(tmp_path)
    proc = run_cli("plan", path.name, "--probe", "3", "--max-narratives", "6", cwd=tmp_path,
                   env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert _tree(tmp_path) == before
    assert re.search(r"^narratives to send: +6$", proc.stdout, re.M)
    assert re.search(r"^latency: +median [\d.]+ ms", proc.stdout, re.M)

    raw = yaml.safe_load(path.read_text())
    raw["model"]["provider"] = "nope"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = run_cli("plan", bad.name, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncrunner: error: config key 'model.")
