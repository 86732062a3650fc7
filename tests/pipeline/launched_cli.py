"""`orchmoe.cli` as `accelerate launch` runs it, reporting how many DistributedDataParallel wrappers are still alive
when `Accelerator.end_training` destroys the process group (one left there can deadlock the rank: see
`orchmoe.pipeline.trainer.finish`)."""

from __future__ import annotations

import gc
import sys

from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from orchmoe.cli import main

end_training = Accelerator.end_training


def counting_end_training(self: Accelerator) -> None:
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {self.process_index}: DistributedDataParallel alive at end_training: {alive}", flush=True)
    end_training(self)


if __name__ == "__main__":
    Accelerator.end_training = counting_end_training
    sys.exit(main())
