"""`python -m kubetune_trainer train|merge|verify|serve|adapter-sync`: the trainer image's entry
point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune-trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one training attempt from a config file")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. training.maxSteps=10")
    merge = sub.add_parser("merge", help="merge an adapter into its base model: local folders "
                                         "(--base/--adapter/--out) or URIs (--base-uri/"
                                         "--adapter-uri/--out-uri, verified and published)")
    merge.add_argument("--base", type=Path)
    merge.add_argument("--adapter", type=Path)
    merge.add_argument("--out", type=Path)
    merge.add_argument("--base-uri")
    merge.add_argument("--revision", default=None)
    merge.add_argument("--adapter-uri")
    merge.add_argument("--adapter-sha256", default=None,
                       help="the manifest digest the adapter must have (the operator pins the "
                            "one it verified)")
    merge.add_argument("--out-uri")
    merge.add_argument("--work-dir", type=Path, default=Path("/tmp/kubetune-merge"))
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    verify = sub.add_parser("verify", help="check an artifact against its manifest")
    verify.add_argument("uri")
    verify.add_argument("--download", type=Path, default=None)
    sub.add_parser("serve", help="the serving runtime (same as `kubetune serve`)",
                   add_help=False)
    sub.add_parser("adapter-sync", help="sidecar that puts verified S3 adapters where vLLM "
                                        "can load them", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["adapter-sync"]:
        from .adaptersync import main as sync_main

        return sync_main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "train":
        from pydantic import ValidationError

        from kubetune.trainerconfig import TrainerConfig

        try:
            cfg = TrainerConfig.load(args.config, args.set)
        except (ValidationError, OSError, ValueError) as exc:
            first = str(exc).splitlines()
            print(f"kubetune-trainer: error: invalid config {args.config}: "
                  f"{' '.join(first[:3])}", file=sys.stderr)
            return 2
        from .train import run

        return run(cfg)
    if args.command == "merge":
        from .merge import MergeError, main_merge, publish_merged

        uris = (args.base_uri, args.adapter_uri, args.out_uri)
        folders = (args.base, args.adapter, args.out)
        if not (all(uris) or all(folders)):
            parser.error("merge: give --base/--adapter/--out or --base-uri/--adapter-uri/"
                         "--out-uri")
        from kubetune.artifacts import VerificationError
        from .sources import SourceError
        from kubetune.storage import StorageError

        try:
            if all(uris):
                result = publish_merged(args.base_uri, args.revision, args.adapter_uri,
                                        args.out_uri, args.dtype, args.work_dir,
                                        args.adapter_sha256)
            else:
                result = main_merge(args.base, args.adapter, args.out, args.dtype)
        except (MergeError, VerificationError, SourceError) as exc:
            print(f"kubetune-trainer: error: {exc}", file=sys.stderr)
            return 2
        except StorageError as exc:
            print(f"kubetune-trainer: error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result))
        return 0
    from kubetune.artifacts import VerificationError, verify as verify_artifact
    from kubetune.storage import Storage, StorageError

    try:
        manifest, digest = verify_artifact(args.uri, Storage(), args.download)
    except (VerificationError, StorageError) as exc:
        print(f"kubetune-trainer: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"uri": args.uri, "manifestSha256": digest, "files": len(manifest["files"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
