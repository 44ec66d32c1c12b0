"""Stage 0, resolve: compose conf/ with Hydra and the schema, validate it, and
write the effective config to params/resolved.yaml.

DVC reads params as raw keys of named files and knows nothing of Hydra's
composition; every later stage therefore lists as params the keys of this
file that it uses. Then an edit anywhere in conf/ (a selected file, a group
switch, an experiment, a schema default) reruns exactly the stages whose
effective values changed. A bad value fails here, before DVC has deleted any
later stage's outputs, and the last good file stays (the write is atomic).
"""

import yaml

from pipeline.config import RESOLVED_FILE, effective
from pipeline.data.files import write_text
from pipeline.entry import output_dir, stage

HEADER = ("# Written from conf/ by the resolve stage of dvc.yaml (`dvc repro`).\n"
          "# Do not edit: edit conf/ and run `dvc repro`. DVC tracks these keys as params.\n")


@stage(against_resolved=False)
def main(cfg):
    path = output_dir() / RESOLVED_FILE.name
    write_text(path, HEADER + yaml.safe_dump(effective(cfg), sort_keys=False, width=120))
    print(f"effective config -> {path}")


if __name__ == "__main__":
    main()
