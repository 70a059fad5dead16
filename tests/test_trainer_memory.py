"""The trainer's memory: the device budget is <= 100 MB peak RSS while training the reference CNN."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch (a tools/dev dependency) builds the reference package")

from nacl.signing import SigningKey

from appliance.modelpkg import write_package
from flctl.model import build_reference_package

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nacl.signing import VerifyKey
    from appliance.modelpkg import load_package
    from appliance.synthetic import SyntheticCamera
    from appliance.trainer import Trainer

    pkg = load_package(sys.argv[1], VerifyKey(bytes.fromhex(sys.argv[2])))
    # Filled in place, as the agent's one-camera sample is: a concatenation would hold the data twice and
    # measure this harness rather than the trainer.
    x = np.empty((2400, *pkg.input_shape), dtype=np.float32)
    y = np.empty(2400, dtype=np.int64)
    for c in range(8):
        x[c * 300 : (c + 1) * 300], y[c * 300 : (c + 1) * 300] = SyntheticCamera(c, seed=1).sample(300)
    result = Trainer(pkg, threads=1).train(pkg.initial_params, x, y, epochs=1, batch_size=32, lr=0.05)
    assert result.metrics["loss_after"] < result.metrics["loss_before"]
    assert "torch" not in sys.modules
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(*(int(status[k].split()[0]) // 1024 for k in ("RssAnon", "RssFile", "VmHWM")))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status for VmHWM")
def test_training_the_reference_cnn_stays_under_100_mb(tmp_path):
    key = SigningKey.generate()
    pkg, _ = build_reference_package("cnn")
    path = tmp_path / "cnn.flpkg"
    write_package(path, pkg, key)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # FL_TRAINER_PYTHON: measure with another interpreter, e.g. a venv with another onnxruntime release.
    python = os.environ.get("FL_TRAINER_PYTHON", sys.executable)
    out = subprocess.run(
        [python, "-c", CHILD, str(path), bytes(key.verify_key).hex()],
        env=env, capture_output=True, text=True, check=False, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    anon_mb, file_mb, peak_mb = map(int, out.stdout.strip().splitlines()[-1].split())
    # File-backed pages (numpy's and onnxruntime's libraries) vary with the page cache by ~10 MB for the
    # same files (docs/budgets.md), so the figure says which part grew.
    figure = (f"peak RSS {peak_mb} MB while training on 2,400 frames (at the end: {anon_mb} MB anonymous, "
              f"{file_mb} MB file-backed)")
    print(figure)
    assert peak_mb <= 100, figure


def test_the_agent_process_receives_a_training_result_without_importing_onnxruntime(tmp_path):
    """The result crosses back from the trainer child by pickle, and unpickling imports the class's module:
    it once lived beside the trainer and pulled onnxruntime (~45 MB resident, bench/agent_memory.py) into
    the long-lived agent process, which never runs a model."""
    import pickle

    from appliance.synthetic import SyntheticCamera
    from appliance.trainer import Trainer

    key = SigningKey.generate()
    path = tmp_path / "cnn.flpkg"
    write_package(path, build_reference_package("cnn")[0], key)
    from appliance.modelpkg import load_package

    pkg = load_package(path, key.verify_key)
    x, y = SyntheticCamera(0, seed=1).sample(64)
    result = Trainer(pkg, threads=1).train(pkg.initial_params, x, y, epochs=1, batch_size=32, lr=0.05)
    payload = tmp_path / "result.pickle"
    payload.write_bytes(pickle.dumps(result))
    agent_side = textwrap.dedent(
        """
        import pickle, sys
        import appliance.agent
        result = pickle.loads(open(sys.argv[1], "rb").read())
        assert result.num_samples == 64, result.num_samples
        print(sorted(m for m in sys.modules if m.split(".")[0] == "onnxruntime"))
        """
    )
    out = subprocess.run([sys.executable, "-c", agent_side, str(payload)], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", f"the agent process imported {out.strip()}"
