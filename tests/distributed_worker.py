"""One process of the 2-process test (run by test_distributed.py, not collected by pytest).

argv: process_id num_processes port workdir. 4 fake CPU devices per process, CPU collectives
over localhost; runs a tiny SFT stage on a (data=2, fsdp=4) mesh over all 8 devices.
`config()` is that run's config; test_distributed.py also runs it in its own process (8 fake
devices) as the 1-process reference.
"""
import os
import sys


def config():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from trainer_utils import load_config, shrink
    cfg = shrink(load_config("sft"), steps=3)
    cfg.train.eval_every = 0
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 1
    return cfg


if __name__ == "__main__":
    pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAXRLHF_NO_PROGRESS"] = "1"

    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=nproc, process_id=pid)

    from jaxrlhf.trainers import runner

    runner.run(config(), workdir)
    print(f"process {jax.process_index()} of {jax.process_count()} done", flush=True)
