"""Writes down what its job sees (config, Hydra's runtime config, working directory,
environment), for tests/test_launch.py to compare the two ways a trial can run."""

import json
import logging
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path=".", config_name="probe")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    seen = {
        "cfg": OmegaConf.to_container(cfg, resolve=True),
        "struct": OmegaConf.is_struct(cfg),
        "job": {k: hc.job[k] for k in ("name", "num", "id", "override_dirname")},
        "env_set": OmegaConf.to_container(hc.job.env_set),
        "overrides": OmegaConf.to_container(hc.overrides, resolve=True),
        "output_dir": hc.runtime.output_dir,
        "cwd": os.getcwd(),
        "env": {k: os.environ.get(k) for k in ("SWEEP_TRIAL_NUMBER", "PROBE")},
        "hydra_resolver": OmegaConf.create({"n": "${hydra:job.num}"}).n,
        "log_files": sorted(
            os.path.basename(h.baseFilename)
            for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler)
        ),
    }
    logging.getLogger(__name__).info("a line in the job's log")
    with open("probe.json", "w") as out:
        json.dump(seen, out, indent=1, sort_keys=True)
    return float(cfg.x) + float(cfg.y)


if __name__ == "__main__":
    main()
