"""The machinery behind `sparseprune compare` and `sparseprune demo`, one job per module.

  config    budgets, sweep and timing presets (FULL, QUICK, DEMO);
  models    the digits MLP and CNN and the input layout each reads;
  registry  method runners by (name, schedule): `register`, `select`, `require`, `Job`, `Outcome`;
  methods/  the built-in runners (unstructured, saliency, structured, depth, ensemble, gates);
  deploy    masks made permanent, shrink, convert, outputs checked;
  measure   nonzero parameters, bytes on disk (safetensors), latency vs torch dense;
  runner    the run itself: dense baselines, one row per (model, method, schedule, level);
  results   rows, the terminal table, CSV and JSON;
  plots     the PNG plots;
  robust    `compare --robust`: standard, AT, AT+VS, beta-Bernoulli, ANP, ANP-VS under PGD.

Add a method by registering a runner:

    from sparseprune.experiments.registry import Outcome, register

    @register("my-method", "one-shot", ("mlp", "cnn"), "what it does")
    def my_method(job):
        my_prune(job.dense, job.sparsity)   # job.dense is a private copy of the trained model
        return Outcome(job.dense)
"""
