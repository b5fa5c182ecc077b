"""`kubetune api`: OpenAI's fine-tuning API (files, jobs, events, checkpoints) over FineTuneJobs.

Torch-free and kopf-free: it needs the kubernetes client and boto3 (the operator extra's)."""
