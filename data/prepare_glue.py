"""Download a GLUE task into data/glue/<task>/ as it ships: train.tsv, dev.tsv, test.tsv.

    python data/prepare_glue.py --task sst2                  # -> data/glue/sst2/{train,dev,test}.tsv
    python data/prepare_glue.py --task cola --out /data/glue
    python data/prepare_glue.py --task rte --url file:///mirror/RTE.zip [--sha256 HEX]
    python finetune.py --task binary --data data/glue/sst2 --init ...

The archives are the ones the GLUE benchmark's download script fetches (dl.fbaipublicfiles.com/glue/data/);
each is streamed to a .part file (a broken download resumes), checked against the sha256 below (the
hashes the Hugging Face `glue` dataset pins; --sha256 overrides one, e.g. for a re-packed mirror), and
unzipped. The files are left unchanged; data/tasks.py reads all of them as they are.

MRPC is not in a GLUE zip: GLUE's script builds it from Microsoft's MSR Paraphrase Corpus, which ships as
a Windows installer. Here it is built the same way from the corpus's two text files as SentEval hosts
them, and GLUE's list of dev pairs: train = the corpus's training pairs that are not dev pairs, dev =
those that are, test = the test pairs without their labels, in GLUE's column layout. For --task mrpc,
--url is the folder URL that holds the three files.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python data/prepare_glue.py` finds data/prepare.py
    sys.path.insert(0, str(ROOT))

from data.prepare import PrepareError, download  # noqa: E402

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
# task: (archive, sha256, bytes)
ARCHIVES = {
    "cola": ("CoLA.zip", "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff", 376_971),
    "sst2": ("SST-2.zip", "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa", 7_439_277),
    "qnli": ("QNLIv2.zip", "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5", 10_627_589),
    "rte": ("RTE.zip", "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee", 697_150),
    "stsb": ("STS-B.zip", "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85", 802_872),
}
MRPC_FILES = {   # file: (default url, sha256)
    "msr_paraphrase_train.txt": ("https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
                                 "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89"),
    "msr_paraphrase_test.txt": ("https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
                                "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784"),
    "mrpc_dev_ids.tsv": (GLUE_URL + "mrpc_dev_ids.tsv", "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7"),
}
TASKS = sorted([*ARCHIVES, "mrpc"])


def prepare_glue(task: str, out="data/glue", url: str | None = None, sha256: str | None = None,
                 quiet: bool = False) -> pathlib.Path:
    """Download (or reuse) and unpack one task; returns out/<task>. A task already there is left alone."""
    if task not in TASKS:
        raise PrepareError(f"--task: unknown GLUE task {task!r}; choose one of {', '.join(TASKS)}")
    out = ROOT / out                                 # an absolute --out stays as it is
    target = out / task
    if (target / "train.tsv").is_file():
        _log(quiet, f"{target} is already prepared")
        return target
    tmp = out / f".{task}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if task == "mrpc":
            if sha256:
                raise PrepareError("--sha256: MRPC is built from three files whose hashes are built in; "
                                   "give --url (their folder) alone")
            _build_mrpc(out / "raw" / "mrpc", tmp, url, quiet)
        else:
            name, default_sha, _ = ARCHIVES[task]
            archive = download(url or GLUE_URL + name, out / "raw" / name, (sha256 or default_sha).lower(), quiet)
            _unzip_task(archive, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(quiet, f"prepared {target}: {', '.join(sorted(p.name for p in target.iterdir()))}")
    return target


def _unzip_task(archive: pathlib.Path, dest: pathlib.Path):
    """Extract the archive and keep the folder that holds train.tsv (the zips wrap their files in SST-2/ etc.)."""
    unpacked = dest.with_name(dest.name + ".zip")
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)                   # extractall refuses absolute paths and '..' in names
        found = sorted(unpacked.rglob("train.tsv"), key=lambda p: len(p.parts))
        if not found:
            raise PrepareError(f"{archive}: no train.tsv inside (is it a GLUE task archive?)")
        os.replace(found[0].parent, dest)
    except zipfile.BadZipFile as e:
        raise PrepareError(f"{archive}: not a valid zip ({e}); remove it to download again") from None
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def _build_mrpc(raw: pathlib.Path, dest: pathlib.Path, base_url: str | None, quiet: bool):
    paths = {name: download((base_url.rstrip("/") + "/" + name) if base_url else default_url, raw / name, sha, quiet)
             for name, (default_url, sha) in MRPC_FILES.items()}
    read = lambda name: [line.rstrip("\r\n").split("\t") for line in
                         paths[name].read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    dev_ids = {tuple(row[:2]) for row in read("mrpc_dev_ids.tsv")}
    train_rows, test_rows = read("msr_paraphrase_train.txt"), read("msr_paraphrase_test.txt")
    header = "\t".join(train_rows[0])                # Quality  #1 ID  #2 ID  #1 String  #2 String
    for rows, name in ((train_rows, "msr_paraphrase_train.txt"), (test_rows, "msr_paraphrase_test.txt")):
        bad = next((i for i, r in enumerate(rows, 1) if len(r) != 5), None)
        if bad:
            raise PrepareError(f"{paths[name]}:{bad}: expected 5 tab-separated fields, got {len(rows[bad - 1])}")
    dest.mkdir(parents=True)
    write = lambda name, lines: (dest / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    write("train.tsv", [header] + ["\t".join(r) for r in train_rows[1:] if tuple(r[1:3]) not in dev_ids])
    write("dev.tsv", [header] + ["\t".join(r) for r in train_rows[1:] if tuple(r[1:3]) in dev_ids])
    write("test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
          + [f"{i}\t" + "\t".join(r[1:]) for i, r in enumerate(test_rows[1:])])


def _log(quiet, msg):
    if not quiet:
        print(msg, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", default="data/glue", help="parent folder; the task lands in OUT/<task> (default data/glue)")
    p.add_argument("--url", help="download from here instead (http, https or file://; for mrpc: the folder URL)")
    p.add_argument("--sha256", help="the archive's expected sha256, instead of the built-in one")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        prepare_glue(a.task, a.out, a.url, a.sha256, a.quiet)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
