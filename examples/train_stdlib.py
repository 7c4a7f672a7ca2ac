"""Train Horizon's reference decoder on the Python standard library's source: what `make run` does.

The whole run (data, model, trainer, progress bar, validation) is ``horizon train`` in
``horizon/cli/train.py``; read it for the API in use. Any flag of ``horizon train --help`` works
here too, for example:

    python examples/train_stdlib.py --steps 300 --preset tiny --batch-size 32 --lr 3e-3
    python examples/train_stdlib.py --text my_corpus.txt --device cuda
"""

import sys

from horizon.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
