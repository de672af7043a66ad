#!/bin/sh
# The measurement of issue 12 (AP/AGE part): split 0 of the miniature Table 1, Table 1 budget
# (200 steps, lr 5e-4, DDIM 20), 50 images per object, seed 0, one thread per process.
# Two processes (AP rows, AGE rows), each authors preset first, then the paper preset.
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD/src
PY=/work/main/.venv/bin/python
COMMON="--splits 0 --steps 200 --lr 5e-4 --ddim-steps 20 --n-per-class 50 --seed 0 --threads 1 --quiet"
nice -n 10 $PY bench/table1.py --rows ap-authors,ap $COMMON --out bench/results/ap-authors/ap > bench/results/ap-authors/logs/ap.log 2>&1 &
nice -n 10 $PY bench/table1.py --rows age-authors,age $COMMON --out bench/results/ap-authors/age > bench/results/ap-authors/logs/age.log 2>&1 &
wait
