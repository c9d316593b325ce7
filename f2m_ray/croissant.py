"""``croissant.json`` of a finished synthetic dataset: its MLCommons Croissant description.

Croissant (JSON-LD on schema.org) is what dataset catalogues and loaders read: the files
(one FileSet of the Parquet under ``data/``), one record set per mass with its label fields,
and the responsible-AI fields (how the masses were made, what data the model and the seeds
came from, the memorization guard used). Built from the manifest alone (pure: no I/O), like
the dataset card beside it.
"""

from __future__ import annotations

from typing import Any

from f2m_ray.schema import DATA_DIR

CROISSANT_NAME = "croissant.json"
RECORD_SET = "masses"
FILE_SET = "parquet-files"
PAPER = ("Feature2Mass: visual feature mixing for labeled synthetic breast-mass generation "
         "(conditional autoencoder GAN with BI-RADS margin and shape embeddings)")

# (column, Croissant data type, description) of every field a record carries; `image` is read from the PNG bytes.
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("sample_id", "sc:Text", "Unique id of the mass: category, run seed and index."),
    ("image", "sc:ImageObject", "The mass ROI: 8-bit greyscale PNG."),
    ("category", "sc:Text", "BI-RADS margin-shape category, e.g. spiculated-irregular."),
    ("margin", "sc:Text", "BI-RADS margin label (by construction: the seeds' margin)."),
    ("shape", "sc:Text", "BI-RADS shape label (by construction: the seeds' shape)."),
    ("margin_id", "sc:Integer", "Index of the margin in the model's vocabulary."),
    ("shape_id", "sc:Integer", "Index of the shape in the model's vocabulary."),
    ("height", "sc:Integer", "Image height in pixels."),
    ("width", "sc:Integer", "Image width in pixels."),
    ("sample_index", "sc:Integer", "Index of the mass within its category in this run."),
    ("run_seed", "sc:Integer", "The run's random seed."),
    ("model_id", "sc:Text", "Id of the generator that decoded the mass."),
    ("bank_id", "sc:Text", "Id of the feature bank the seeds came from."),
    ("label_confidence", "sc:Float", "The judge's probability of the mass's own labels (empty without a judge)."),
    ("nearest_seed_distance", "sc:Float", "RMS pixel distance to the nearest seed ROI."),
    ("guards_passed", "sc:Boolean", "Whether the mass passed every guard of the run."),
)


def _is_phantom(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("phantom")


def source_words(provenance: dict[str, Any]) -> tuple[str, str]:
    """(what the model was trained on, what the seeds are), in words."""
    trained = provenance.get("model_training_data")
    seeds = provenance.get("seed_data_description") or provenance.get("seed_data")
    trained_words = (f"procedural phantoms ({trained}), no patient data" if _is_phantom(trained)
                     else f"{trained}" if trained else "not recorded in the model")
    seed_words = (f"{seeds}" + (" (procedural phantoms, no patient data)" if _is_phantom(provenance.get("seed_data")) else "")
                  if seeds else "not recorded in the bank")
    return trained_words, seed_words


def croissant(manifest: dict[str, Any], name: str = "synthetic-birads-masses") -> dict[str, Any]:
    """The Croissant 1.0 JSON-LD (with the RAI vocabulary) of the dataset described by `manifest`."""
    counts: dict[str, int] = manifest["counts"]
    arguments = manifest.get("arguments", {})
    guards = manifest.get("guards", {})
    provenance = manifest.get("provenance", {})
    trained_words, seed_words = source_words(provenance)
    rows = sum(counts.values())
    fields = [
        {
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/{column}",
            "name": column,
            "description": description,
            "dataType": data_type,
            "source": {
                "fileSet": {"@id": FILE_SET},
                "extract": {"column": column},
                **({"transform": {"jsonPath": "bytes"}} if column == "image" else {}),
            },
        }
        for column, data_type, description in FIELDS
    ]
    if guards.get("min_seed_distance") is not None or guards.get("min_label_confidence") is not None:
        total = guards.get("total", {})
        guard_words = (f"Guards: label confidence >= {guards.get('min_label_confidence')} (judge {guards.get('judge_id')}), "
                       f"RMS distance to the nearest seed >= {guards.get('min_seed_distance')}; "
                       f"{total.get('rejected', 0)} of {total.get('candidates', 0)} candidates rejected, "
                       f"{total.get('unmet', 0)} masses kept with guards_passed = false.")
    else:
        guard_words = "No memorization or label guard was used in this run (f2m-ray synthesize --min-seed-distance, --judge)."
    return {
        "@context": _context(),
        "@type": "sc:Dataset",
        "conformsTo": ["http://mlcommons.org/croissant/1.0", "http://mlcommons.org/croissant/RAI/1.0"],
        "name": name,
        "description": (f"{rows} synthetic 64x64 breast-mass ROIs in {len(counts)} BI-RADS margin-shape "
                        f"categories, labeled by construction, made by f2m-ray synthesize (Feature2Mass)."),
        "url": "README.md",
        "license": "README.md#license",
        "version": str(manifest.get("schema_version")),
        "datePublished": manifest.get("finished"),
        "creator": {"@type": "sc:Organization", "name": "f2m-ray"},
        "citeAs": PAPER,
        "keywords": ["synthetic", "medical imaging", "mammography", "BI-RADS", "breast mass", "Feature2Mass"],
        "isLiveDataset": False,
        "distribution": [
            {
                "@type": "cr:FileSet",
                "@id": FILE_SET,
                "name": FILE_SET,
                "description": "The masses, one Parquet file per range of samples of a category.",
                "encodingFormat": "application/x-parquet",
                "includes": f"{DATA_DIR}/*/*.parquet",
            }
        ],
        "recordSet": [
            {
                "@type": "cr:RecordSet",
                "@id": RECORD_SET,
                "name": RECORD_SET,
                "description": "One synthetic mass with its BI-RADS labels and how it was made.",
                "key": {"@id": f"{RECORD_SET}/sample_id"},
                "field": fields,
            }
        ],
        "rai:dataCollection": (
            f"Generated, not collected: each mass is decoded by the Feature2Mass generator (model "
            f"{manifest.get('model_id')}, preset {manifest.get('preset')}) from a mix of the visual features of "
            f"K={arguments.get('k')} seed ROIs of its own category (mixing {arguments.get('mixing')}, weights on a "
            f"{arguments.get('step')} grid, Dirichlet alpha {arguments.get('alpha')}, run seed {arguments.get('seed')}). "
            f"The model was trained on: {trained_words}. The seeds are: {seed_words} (feature bank {manifest.get('bank_id')})."
        ),
        "rai:dataCollectionType": ["Synthetic data"],
        "rai:dataAnnotationProtocol": (
            "Labels by construction: every mass carries the margin and shape of the seeds it was mixed from; "
            "no human annotation. Label fidelity is measured by `f2m-ray evaluate` against a classifier of real data."
        ),
        "rai:machineAnnotationTools": [f"f2m-ray {manifest.get('tool_version')}"],
        "rai:personalSensitiveInformation": (
            f"Seeds: {seed_words}. A synthetic mass can resemble a seed ROI closely. {guard_words}"
        ),
        "rai:dataBiases": (
            "The masses inherit the look, acquisition and label balance of the model's training data and of the "
            "seeds; the category counts here are the counts requested, not a clinical prevalence."
        ),
        "rai:dataLimitations": (
            "64x64 mass ROIs, not whole mammograms; the generator's fidelity to individual masses is limited "
            "(see the model card). Not for diagnosis."
        ),
        "rai:dataUseCases": (
            "Training or augmenting BI-RADS margin and shape classifiers and mass detectors' ROI stages; "
            "check against real validation data before use."
        ),
        "rai:dataSocialImpact": (
            "Synthetic data can ease access to rare categories; a model trained on it must still be validated "
            "on real patients' images before any clinical use."
        ),
    }


def _context() -> dict[str, Any]:
    """The Croissant 1.0 JSON-LD context, with the RAI prefix."""
    return {
        "@language": "en",
        "@vocab": "https://schema.org/",
        "citeAs": "cr:citeAs",
        "column": "cr:column",
        "conformsTo": "dct:conformsTo",
        "cr": "http://mlcommons.org/croissant/",
        "rai": "http://mlcommons.org/croissant/RAI/",
        "data": {"@id": "cr:data", "@type": "@json"},
        "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
        "dct": "http://purl.org/dc/terms/",
        "equivalentProperty": "cr:equivalentProperty",
        "examples": {"@id": "cr:examples", "@type": "@json"},
        "extract": "cr:extract",
        "field": "cr:field",
        "fileProperty": "cr:fileProperty",
        "fileObject": "cr:fileObject",
        "fileSet": "cr:fileSet",
        "format": "cr:format",
        "includes": "cr:includes",
        "isLiveDataset": "cr:isLiveDataset",
        "jsonPath": "cr:jsonPath",
        "key": "cr:key",
        "md5": "cr:md5",
        "parentField": "cr:parentField",
        "path": "cr:path",
        "recordSet": "cr:recordSet",
        "references": "cr:references",
        "regex": "cr:regex",
        "repeated": "cr:repeated",
        "replace": "cr:replace",
        "samplingRate": "cr:samplingRate",
        "sc": "https://schema.org/",
        "separator": "cr:separator",
        "source": "cr:source",
        "subField": "cr:subField",
        "transform": "cr:transform",
    }
