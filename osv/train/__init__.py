"""Training: the embedded teacher (`osv teacher`) and the two OSV stages (`osv train`).

teacher.py   EDM training of the small teacher / linking the SVD teacher, held-out metrics
distill.py   stage 1 (LGP) and stage 2 (ACD) in one loop, `train_run` (the submitit work function)
loop.py      seeded data order and noise, precision, stop signals, non-finite guard
checkpoint.py, distributed.py, logging.py, export.py
"""
