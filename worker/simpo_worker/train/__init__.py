"""Training: the SimPO loss, the jitted train and eval steps, checkpoints and the trainer that drives them.
May import data, weights, observe, parallel, store, model and contract; never infer."""
