"""Fine-tune through `kubetune api` with the official openai client, then chat with the result.

    KUBETUNE_API=http://localhost:8000/v1 KUBETUNE_API_KEY=kt-... \
    KUBETUNE_SERVE=http://localhost:8001/v1 python finetune.py train.jsonl
"""

import os
import sys
import time

from openai import OpenAI

api = OpenAI(base_url=os.environ["KUBETUNE_API"], api_key=os.environ["KUBETUNE_API_KEY"])
with open(sys.argv[1], "rb") as handle:
    data = api.files.create(file=handle, purpose="fine-tune")
job = api.fine_tuning.jobs.create(
    model=os.environ.get("KUBETUNE_MODEL", "smollm2-135m"), training_file=data.id,
    suffix="example", method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1}}})
seen = set()
while job.status not in ("succeeded", "failed", "cancelled"):
    time.sleep(10)
    for event in reversed(api.fine_tuning.jobs.list_events(job.id, limit=50).data):
        if event.id not in seen:
            seen.add(event.id)
            print(f"{event.created_at} {event.level:<5} {event.message}")
    job = api.fine_tuning.jobs.retrieve(job.id)
print(job.status, job.fine_tuned_model, job.error)
if job.fine_tuned_model and os.environ.get("KUBETUNE_SERVE"):
    serve = OpenAI(base_url=os.environ["KUBETUNE_SERVE"], api_key="unused")
    reply = serve.chat.completions.create(model=job.fine_tuned_model, messages=[
        {"role": "user", "content": "Hello!"}])
    print(reply.choices[0].message.content)
