"""The parts of ``mae-fast pretrain`` (``mae_fast.pretrain`` wires them together):

* ``seeds``      - stateless randomness: per-sample augmentation seeds, per-step mask noise, RNG states;
* ``loader``     - the data set and the per-epoch batches, one loader (and its workers) for the run;
* ``amp``        - which autocast dtype, and why;
* ``step``       - one training iteration: forward, backward, optimizer update, device-side loss sums
                   and the non-finite-step policy (no host read per iteration);
* ``state``      - checkpoints and resume (the one part that reads and writes training state);
* ``log``        - the run header, log.csv, TensorBoard, the progress bar.
"""
