"""Training, from params to MLflow runs: a run's config (`config`), the dataset as dialogues (`task`), the loop run
by each worker (`loop`, with its `sessions`, `clock` and the `distributed` step), the driver over Ray and MLflow
(`driver`, `cluster`, `progress`), the searches (`tune`), and stage 1, an encoder fine-tuned before its features are
written (`finetune`)."""
