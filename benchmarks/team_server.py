"""Figures for the team tracking server (PostgreSQL + S3 via moto, proxied artifacts); nothing asserts.

Prints: stack start time (PostgreSQL initdb + start, moto S3, mlflow server up), artifact upload and
download throughput through the server's proxy, and the wall time of one locked ``select`` registry
update, alone and with two selects racing (processes).

Usage: ``.venv/bin/python -m benchmarks.team_server [--mb 20] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from config.paths import REPO_ROOT
from tools import mlflow_server

RACE_CODE = """
import json, sys, time
from registry import select as s
from registry.mlflow_client import get_client
from registry.rule import Candidate, SelectionRule, select
metrics = {"image_AUROC": 0.9, "onnx_max_abs_diff": 0.0}
summary = s.EvalSummary(model="m", run_id=sys.argv[1], model_uri=sys.argv[2], metrics=metrics,
                        path=__import__("pathlib").Path("x"), raw={"data_version": "bench"})
sel = select([Candidate("m", summary.metrics)], SelectionRule.from_params({"metric": "image_AUROC"}))
client = get_client()
t = time.perf_counter()
s.register_champion(client, sel, summary, model_name="bench", alias="champion")
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20, help="artifact size for the proxy throughput")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with tempfile.TemporaryDirectory(prefix="bench-team-") as tmp:
        start = time.perf_counter()
        with mlflow_server.shared_server(
            work_dir=Path(tmp), port=mlflow_server.free_port(), local_s3=True, workers=1, env=env
        ) as stack:
            print(f"stack up (PostgreSQL initdb+start, moto S3, mlflow): {time.perf_counter() - start:.1f} s")
            os.environ["MLFLOW_TRACKING_URI"] = stack.url
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
            import mlflow

            blob = Path(tmp) / "blob.bin"
            blob.write_bytes(os.urandom(args.mb * 2**20))
            up, down = [], []
            for _ in range(args.repeats):
                with mlflow.start_run() as run:
                    t = time.perf_counter()
                    mlflow.log_artifact(str(blob))
                    up.append(time.perf_counter() - t)
                t = time.perf_counter()
                mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/blob.bin", dst_path=tmp + "/dl")
                down.append(time.perf_counter() - t)
            print(
                f"artifact proxy, {args.mb} MB: upload {args.mb / statistics.median(up):.0f} MB/s, "
                f"download {args.mb / statistics.median(down):.0f} MB/s (median of {args.repeats})"
            )
            import mlflow.onnx
            from onnx import TensorProto, helper

            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
            with mlflow.start_run() as run:
                uri = mlflow.onnx.log_model(helper.make_model(graph), name="model").model_uri
            child_env = {**env, "MLFLOW_TRACKING_URI": stack.url, "PYTHONPATH": str(REPO_ROOT)}

            def race(n: int) -> list[float]:
                procs = [
                    subprocess.Popen(
                        [sys.executable, "-c", RACE_CODE, run.info.run_id, uri],
                        env=child_env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(n)
                ]
                seconds = []
                for proc in procs:
                    out, err = proc.communicate()
                    if proc.returncode != 0:
                        raise SystemExit(f"select child failed:\n{err[-3000:]}")
                    seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
                return seconds

            alone = [race(1)[0] for _ in range(args.repeats)]
            racing = [max(race(2)) for _ in range(args.repeats)]
            print(
                f"locked select registry update: alone {statistics.median(alone):.2f} s, "
                f"slower of two racing {statistics.median(racing):.2f} s (median of {args.repeats})"
            )


if __name__ == "__main__":
    main()
