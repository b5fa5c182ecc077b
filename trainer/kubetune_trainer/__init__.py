"""The kubetune trainer (PEFT + TRL). Never imports kopf."""
