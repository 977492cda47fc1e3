"""Preference strength of any preference / ranking file under an exported RM ensemble.

  python tools/preference_strength.py --ensemble /tmp/rm_ens --data pairs.jsonl \
      --format preference --out /tmp/strength
  python tools/preference_strength.py --ensemble /tmp/rm_ens_hh \
      --data ../shared/data/hh-rlhf-harmless/train.jsonl.gz --format hh --on_bad_row skip

For every ranked pair (chosen i, rejected j) of data row `index`: d_m = r_m(chosen) − r_m(rejected)
for each member m of the ensemble (an `rm_ensemble` stage dir), μ = mean, σ = population std.
Writes <out>/strength.jsonl ({index, chosen, rejected, mu, sigma, d}) and
<out>/strength_hist.png, and prints a JSON summary. `index` is the row's position in the file
(the same numbering the RM stage uses), so the output can be given to an `rm` run on the same
file as `--config.rm.strength_file`.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ensemble", required=True, help="an rm_ensemble stage directory")
    ap.add_argument("--data", required=True, help='a data path, or "synthetic"')
    ap.add_argument("--format", default="preference", choices=("preference", "hh", "ranking"))
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", default="", help="output dir (default: the ensemble dir)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--max_k", type=int, default=4)
    ap.add_argument("--on_bad_row", default="error", choices=("error", "skip"))
    args = ap.parse_args(argv)

    import jax
    from jaxrlhf import sharding as shd
    from jaxrlhf.data import build_dataset, load_tokenizer
    from jaxrlhf.data.preference_strength import write_strength
    from jaxrlhf.models.reward import load_ensemble, member_dirs
    from jaxrlhf.trainers import common, rm_ensemble

    dirs = member_dirs(args.ensemble)
    tokenizer = load_tokenizer(common.read_meta(dirs[0]).get("tokenizer", "byte"))
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    graphdef, stacked, model0 = load_ensemble(args.ensemble, mesh)
    common.check_tokenizer(tokenizer, model0.cfg, {"ensemble member 0": dirs[0]})
    out = args.out or args.ensemble
    ds = build_dataset(dict(path=args.data, format=args.format, split=args.split,
                            on_bad_row=args.on_bad_row, max_len=args.max_len,
                            max_k=args.max_k), tokenizer, workdir=out)
    rows = rm_ensemble.score_strength(stacked, graphdef, ds, mesh, args.batch)
    if jax.process_index() == 0:
        path = write_strength(out, rows)
        mu = np.asarray([r["mu"] for r in rows])
        sigma = np.asarray([r["sigma"] for r in rows])
        print(json.dumps({"strength_file": path, "members": len(dirs), "pairs": len(rows),
                          "mu_mean": float(mu.mean()), "sigma_mean": float(sigma.mean()),
                          "frac_mu_negative": float((mu < 0).mean()),
                          "mu_quantiles": {q: float(np.quantile(mu, q))
                                           for q in (0.1, 0.2, 0.5, 0.8)},
                          "rejected_rows": ds.report.n_rejected}, indent=2))


if __name__ == "__main__":
    main()
