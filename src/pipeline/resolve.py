"""Stage 0, resolve: compose conf/ with Hydra and the schema, validate it, and
write the effective config to params/resolved.yaml, the dataset's files and
class names to params/dataset.yaml.

DVC reads params as raw keys of named files and knows nothing of Hydra's
composition; every later stage therefore lists as params the keys of these
files that it uses. Then an edit anywhere in conf/ (a selected file, a group
switch, an experiment, a schema default) reruns exactly the stages whose
effective values changed. A bad value fails here, before DVC has deleted any
later stage's outputs, and the last good files stay (each write is atomic).
"""

import yaml

from pipeline.config import effective, split_effective
from pipeline.data.files import write_text
from pipeline.entry import output_dir, stage

HEADER = ("# Written from conf/ by the resolve stage of dvc.yaml (`dvc repro`).\n"
          "# Do not edit: edit conf/ and run `dvc repro`. DVC tracks these keys as params.\n")


@stage(against_resolved=False)
def main(cfg):
    for file, values in split_effective(effective(cfg)).items():
        path = output_dir() / file.name
        write_text(path, HEADER + yaml.safe_dump(values, sort_keys=False, width=120))
        print(f"effective config -> {path}")


if __name__ == "__main__":
    main()
