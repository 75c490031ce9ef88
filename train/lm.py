"""Pre-train or fine-tune a decoder: next-token cross-entropy on packed text.

    python -m train.lm --config configs/train/lm_tiny.yml --workdir runs/lm [key=value ...]

Ensemble members come from this job: different ``seed`` values (initialisation
and data order), ``data.bootstrap=true`` with different ``data.data_seed``
(bagging: each epoch draws rows with replacement), or the checkpoints of one
run. ``init_from`` fine-tunes an HF model directory (task models, bases).
The trained model is written to ``WORKDIR/model`` (HF format, with the
tokenizer) unless ``export: false``.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from jaxcombine.training import lm_loss
from train import common


def main(argv=None) -> None:
    args = common.parse_args(argv, "lm")
    config = common.load_config(args.config, args.overrides, common.BASE_DEFAULTS)
    mesh = common.start(config)
    tokenizer_file = common.tokenizer_path(config)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    dataset = common.load_data(config, tokenizer)
    model = common.make_model(config, tokenizer.get_vocab_size())
    graphdef, params = common.split_params(model)
    params = common.run("lm", config, args.workdir, lm_loss(graphdef), params, dataset, mesh)
    common.export(config, args.workdir, graphdef, params, tokenizer_file)


if __name__ == "__main__":
    common.entry(main)
