"""The kubetune operator (kopf). Never imports torch."""
