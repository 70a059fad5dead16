"""Train an exported package the way a device does, in a process of its own: `python tests/device_training.py
PACKAGE AGGREGATOR_PUB_HEX DATA.npz EPOCHS` prints JSON with the loss of each epoch and whether torch was
imported (it must not be: devices have onnxruntime and numpy only). DATA.npz holds x and y."""

from __future__ import annotations

import json
import sys

import numpy as np
from nacl.signing import VerifyKey

from appliance.modelpkg import load_package
from appliance.trainer import Trainer


def main(package: str, pub_hex: str, data: str, epochs: int) -> dict:
    pkg = load_package(package, VerifyKey(bytes.fromhex(pub_hex)))
    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    trainer = Trainer(pkg, threads=1)
    params = dict(pkg.initial_params)
    losses = []
    for epoch in range(epochs):
        result = trainer.train(params, x, y, epochs=1, batch_size=32, lr=float(pkg.optimizer["lr"]), seed=epoch,
                               measure=False)
        params = {k: params[k] + result.delta[k] for k in params}
        losses.append(result.metrics["train_loss"])
    final = trainer.evaluate(params, x, y)
    return {"losses": losses, "evaluation": final, "torch_imported": "torch" in sys.modules,
            "updated": sorted(k for k, v in result.delta.items() if np.any(v != 0))}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
