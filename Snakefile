# capsmed: capsule networks for medical image segmentation and classification.
#
#   snakemake --profile workflow/profiles/default   # the built-in demo (what `make demo` runs)
#   snakemake --configfile config/examples/msd_hippocampus.yaml --config data_root=...
#   snakemake --profile workflow/profiles/slurm   # on a SLURM cluster
#
# Every rule is one `capsmed <stage>` call (see `capsmed --help`); the logic lives in the package.
from snakemake.utils import min_version

min_version("9.0")


# The demo config, unless a config is given with --configfile (Snakemake would otherwise merge the
# two, and the demo datasets would run beside yours).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary.json",
        f"{RESULTS}/index.html",
        export_targets(),
