"""The server's two stores: FineTuneJobs (and Events, and key Secrets) in Kubernetes, uploaded
files and checkpoints in S3. Every call has a total deadline: a slow apiserver or S3 endpoint
costs a request a 504, never a thread held for good."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from typing import Any, Callable, TypeVar

from .config import Settings
from .errors import ApiError, invalid
from .jobspec import CANCEL_ANNOTATION, LABEL

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
CHECKPOINT = re.compile(r"/checkpoints/step-(\d{1,12})/COMPLETE$")
MAX_LISTED = 1000  # objects one list request reads (jobs, files, events)
T = TypeVar("T")
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="api-call")


def with_deadline(seconds: float, what: str, call: Callable[[], T]) -> T:
    """`call()`, or a 504 once `seconds` have passed (the call's thread is abandoned; its own
    socket timeouts end it)."""
    future = _pool.submit(call)
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise ApiError(504, f"{what} did not answer within {seconds:g} s", None,
                       "upstream_timeout") from None


class Kube:
    def __init__(self, api, settings: Settings):
        from kubernetes import client

        self.core, self.custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        self.deadline = settings.deadline_seconds
        self.key_namespace = settings.key_namespace

    def _call(self, what: str, method, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException

        def run():
            response = method(*args, _preload_content=False,
                              _request_timeout=(5, self.deadline), **kwargs)
            try:
                return json.loads(response.data or b"null")
            finally:
                response.release_conn()
        try:
            return with_deadline(self.deadline, "the Kubernetes API", run)
        except ApiException as exc:
            raise _kube_error(what, exc) from None

    def key_secrets(self) -> list[dict]:
        found = self._call("secrets", self.core.list_namespaced_secret, self.key_namespace,
                           label_selector="kubetune.io/api-key=true", limit=MAX_LISTED)
        return found.get("items") or []

    def create_job(self, namespace: str, manifest: dict) -> dict:
        return self._call("fine-tuning job", self.custom.create_namespaced_custom_object,
                          GROUP, VERSION, namespace, PLURAL, manifest)

    def get_job(self, namespace: str, name: str) -> dict | None:
        try:
            obj = self._call("fine-tuning job", self.custom.get_namespaced_custom_object,
                             GROUP, VERSION, namespace, PLURAL, name)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return obj if (obj.get("metadata", {}).get("labels") or {}).get(LABEL) else None

    def list_jobs(self, namespace: str) -> list[dict]:
        found = self._call("fine-tuning jobs", self.custom.list_namespaced_custom_object,
                           GROUP, VERSION, namespace, PLURAL, label_selector=f"{LABEL}=true",
                           limit=MAX_LISTED)
        items = found.get("items") or []
        return sorted(items, key=lambda o: (o["metadata"].get("creationTimestamp", ""),
                                            o["metadata"]["name"]), reverse=True)

    def events(self, namespace: str, obj: dict) -> list[dict]:
        meta = obj["metadata"]
        found = self._call("events", self.core.list_namespaced_event, namespace,
                           field_selector=f"involvedObject.uid={meta['uid']}", limit=MAX_LISTED)
        return found.get("items") or []

    def cancel(self, namespace: str, name: str, when: str) -> dict:
        """Annotate the job as cancelled and suspend it: the trainer stops (after saving a
        checkpoint) and nothing restarts it; the record and its artifacts stay."""
        patch = {"metadata": {"annotations": {CANCEL_ANNOTATION: when}},
                 "spec": {"scheduling": {"suspend": True}}}
        return self._call("fine-tuning job", self.custom.patch_namespaced_custom_object,
                          GROUP, VERSION, namespace, PLURAL, name, patch)


def _kube_error(what: str, exc) -> ApiError:
    """The apiserver's refusal, in OpenAI's shape: admission and schema messages are the
    user's to read (400); anything else is ours (502), without the response body."""
    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        pass
    if exc.status == 404:
        return ApiError(404, f"No such {what}", None, "not_found")
    if exc.status in (400, 422):
        return invalid(f"the FineTuneJob was refused: {message[:2000]}", None, "invalid_job")
    if exc.status == 409:
        return ApiError(409, f"{what}: conflict, retry", None, "conflict")
    return ApiError(502, f"the Kubernetes API answered {exc.status} for {what}", None,
                    "upstream_error")


class Files:
    """Uploaded files at <storage>/files/<namespace>/<id>.jsonl (converted records) and
    <id>.json (the file object and what the jobs need: kind, sha256, uri)."""

    def __init__(self, settings: Settings):
        from ..storage import Location, Storage

        self.root = Location.parse(settings.storage_uri.rstrip("/"))
        if self.root.scheme != "s3":
            raise ValueError("--storage must be an s3:// URI (the trainer pods read from it)")
        self.s3 = Storage(settings.s3_endpoint, settings.s3_region, retries=2).s3
        self.deadline = settings.deadline_seconds

    def _key(self, namespace: str, name: str) -> str:
        return f"{self.root.key}/files/{namespace}/{name}".lstrip("/")

    def _s3(self, call: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return with_deadline(self.deadline, "S3", call)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise ApiError(404, "No such file", None, "file_not_found") from None
            raise ApiError(502, f"S3 answered {code or 'an error'}", None,
                           "upstream_error") from None
        except BotoCoreError as exc:
            raise ApiError(502, f"S3 failed: {type(exc).__name__}", None,
                           "upstream_error") from None

    def data_uri(self, namespace: str, file_id: str) -> str:
        return f"s3://{self.root.bucket}/{self._key(namespace, file_id + '.jsonl')}"

    def put(self, namespace: str, record: dict, body: bytes) -> None:
        """The data first, its record last: a record always names data that exists."""
        bucket = self.root.bucket
        self._s3(lambda: self.s3.put_object(Bucket=bucket, Body=body, Key=self._key(
            namespace, record["id"] + ".jsonl")))
        self._s3(lambda: self.s3.put_object(Bucket=bucket, Body=json.dumps(record).encode(),
                                             Key=self._key(namespace, record["id"] + ".json")))

    def get(self, namespace: str, file_id: str) -> dict:
        def read() -> bytes:
            body = self.s3.get_object(Bucket=self.root.bucket,
                                      Key=self._key(namespace, file_id + ".json"))["Body"]
            try:
                return body.read(65536)
            finally:
                body.close()
        return json.loads(self._s3(read))

    def content(self, namespace: str, file_id: str, limit: int) -> bytes:
        def read() -> bytes:
            body = self.s3.get_object(Bucket=self.root.bucket,
                                      Key=self._key(namespace, file_id + ".jsonl"))["Body"]
            try:
                return body.read(limit)
            finally:
                body.close()
        return self._s3(read)

    def list(self, namespace: str) -> list[dict]:
        prefix = self._key(namespace, "")
        found = self._s3(lambda: self.s3.list_objects_v2(
            Bucket=self.root.bucket, Prefix=prefix, MaxKeys=MAX_LISTED))
        ids = [o["Key"][len(prefix):-len(".json")] for o in found.get("Contents", [])
               if o["Key"].endswith(".json")]
        records = [self.get(namespace, i) for i in ids]
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete(self, namespace: str, file_id: str) -> None:
        self.get(namespace, file_id)  # 404 when absent
        for name in (file_id + ".json", file_id + ".jsonl"):
            key = self._key(namespace, name)
            self._s3(lambda k=key: self.s3.delete_object(Bucket=self.root.bucket, Key=k))

    def checkpoints(self, output_uri: str) -> list[tuple[int, int]]:
        """(step, Unix time) of the complete checkpoints under a job's output, which must lie
        under this server's storage (a job edited by hand to point elsewhere lists none)."""
        jobs = f"s3://{self.root.bucket}/{self.root.key}/jobs/".replace("//jobs", "/jobs")
        if not output_uri.startswith(jobs):
            return []
        prefix = output_uri[len(f"s3://{self.root.bucket}/"):].rstrip("/") + "/checkpoints/"
        found = self._s3(lambda: self.s3.list_objects_v2(
            Bucket=self.root.bucket, Prefix=prefix, MaxKeys=MAX_LISTED))
        out = []
        for obj in found.get("Contents", []):
            match = CHECKPOINT.search("/" + obj["Key"])
            if match:
                out.append((int(match.group(1)), int(obj["LastModified"].timestamp())))
        return out


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
