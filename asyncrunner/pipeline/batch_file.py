"""`asyncrunner batch-file`: a new experiment whose requests go to a JSONL file instead of
the network, for an offline node (`vllm run-batch`) or a Batch API upload by hand.

    config -> the plan, as `run` makes it (ingest, guards) -> the experiment record, its
    sample and a session row (one transaction) -> every narrative of the selection as a
    request line (BatchCodec.line), written atomically, mode 0600 -> the experiment waits,
    `interrupted`, for `batch-import` (pipeline.batch_import), which reads the answers back.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import structlog

from asyncrunner import logs
from asyncrunner.db import experiments, sessions
from asyncrunner.db.locks import ExperimentLock
from asyncrunner.db.schema import connect
from asyncrunner.pipeline.batch_codec import BatchCodec, resolve_mode
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.producer import produce
from asyncrunner.pipeline.runner import PipelineSpec
from asyncrunner.vocab import SessionEnd, Status

if TYPE_CHECKING:
    pass

log = structlog.get_logger("asyncrunner.pipeline.batch_file")

WAITING_REASON = "waiting for batch-import"


def batch_file_command(db_path: str | Path, config_path: str | Path, out_path: str | Path, *,
                       overrides: Mapping[str, Any], env: Mapping[str, str],
                       out: IO[str] = sys.stdout) -> int:
    """`asyncrunner batch-file`: a new experiment, as `run` creates it (ingest, guards,
    record), whose requests are written to `out_path` (JSONL, atomically, mode 0600) instead
    of sent; it waits, `interrupted`, for `batch-import`."""
    from asyncrunner.db import backup
    from asyncrunner.plan import RunRequest, complete, draft
    from asyncrunner.session import pipeline_spec, record_session

    req = RunRequest(db_path=Path(db_path), config_path=str(config_path),
                     overrides=dict(overrides), env=env)
    d = draft(req)
    target = Path(out_path)
    with closing(connect(req.db_path)) as conn, ExperimentLock(req.db_path, d.experiment_id):
        backup.backup_before_new_writes(conn, req.db_path)
        plan = complete(conn, d)
        spec = pipeline_spec(plan)
        session_id = uuid.uuid4().hex
        record_session(conn, plan, session_id, "batch-file")
        print(f"experiment_id: {plan.experiment_id}", file=out, flush=True)
        try:
            logs.open_run_log(plan.config.run.log_dir, plan.experiment_id)
            logs.bind(experiment_id=plan.experiment_id, session=session_id)
            for warning in plan.warnings:
                log.warning("plan_warning", message=warning)
            mode = resolve_mode(conn, plan.experiment_id, plan.config.model.response_format)
            codec = BatchCodec(replace(spec.client,
                                       response_format=None if mode == "none" else mode),
                               spec.prompt)
            n = anyio.run(_write_file, codec, spec, target)
        except BaseException as exc:
            reason = f"batch file not written: {type(exc).__name__}: {exc}"[:500]
            experiments.set_status(conn, plan.experiment_id, Status.FAILED, reason)
            sessions.end_session(conn, session_id, SessionEnd.FAILED, reason)
            raise
        finally:
            logs.close_run_log()
            logs.clear()
        reason = f"{WAITING_REASON}: {n} requests in {target}"
        experiments.set_status(conn, plan.experiment_id, Status.INTERRUPTED, reason[:500])
        sessions.end_session(conn, session_id, SessionEnd.INTERRUPTED, reason[:500])
    print(f"batch file: {target} ({n} requests, model {plan.config.model.name})", file=out)
    print(f"next: run it (OpenAI Batch API, or `vllm run-batch -i {target} -o ANSWERS.jsonl "
          f"--model {plan.config.model.name}`), then `asyncrunner batch-import "
          f"{plan.experiment_id} ANSWERS.jsonl`", file=out)
    return 0



async def _write_file(codec: BatchCodec, spec: PipelineSpec, target: Path) -> int:
    """Every narrative of the selection as a request line, into `target` atomically (a
    private temporary file beside it, renamed when complete). Returns the line count."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    n = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            handout = Handout()
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, spec.db_path, spec.selection, handout)
                async with handout:
                    async for narrative in handout:
                        fh.write(codec.line(narrative))
                        n += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
    finally:
        if temp.exists():
            temp.unlink()
    return n


