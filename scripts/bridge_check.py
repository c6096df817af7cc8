"""How far a bridge closes the gap of the shallow model: its loss on held-out stage-1 text with and without bridges.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bridge_check.py     # after `elo assets`; about a minute on 2 cores

Fits the bridge of the default shallow model (layers 0 and 29 of SmolLM2-135M) on 16 sequences of 256 tokens of
the German training corpus and reports the mean next-token loss on 8 other sequences.
"""

import shutil
import tempfile
from pathlib import Path

import torch

from elo_cpt import checkpoint, data, surgery
from elo_cpt.demo import assets


def loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def main() -> None:
    found = assets.prepare_assets()
    tokenizer = checkpoint.load_tokenizer(found.model)
    rows = data.load_training_data([str(found.train_target)], tokenizer, 256, 24 * 256, cache_dir=None)
    ids = torch.stack([rows[i]["input_ids"] for i in range(len(rows))])
    calibration, held_out = ids[:16], ids[16:]
    work = Path(tempfile.mkdtemp(prefix="elo-bridge-check-"))
    try:
        shallow = surgery.detach(found.model, "0,-1", work / "shallow")
        print(f"shallow model, no bridge: {loss(checkpoint.load_model(shallow).eval(), held_out):.2f} nats/token")
        surgery.add_bridges(found.model, shallow, calibration)
        bridged = checkpoint.load_model(shallow).eval()
        surgery.apply_bridges(bridged, shallow)
        print(f"shallow model, bridged:   {loss(bridged, held_out):.2f} nats/token")
        print(f"full model:               {loss(checkpoint.load_model(found.model).eval(), held_out):.2f} nats/token")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
