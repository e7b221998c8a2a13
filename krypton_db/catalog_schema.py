"""The catalog's tables (DDL) and the migrations from older layouts.

Plain tables and plain types only (INTEGER, BIGINT, FLOAT, VARCHAR, VARCHAR[], INTEGER[],
BLOB, TIMESTAMP; JSON kept as VARCHAR text), so the DuckDB CLI reads the file as is.
``meta.schema_version`` names the layout; ``MIGRATIONS[v]`` takes a version-v file to v + 1.
"""

SCHEMA_VERSION = 5

_TUNED_TAU = """
CREATE TABLE IF NOT EXISTS tuned_tau (
    model_name VARCHAR NOT NULL,
    domain VARCHAR NOT NULL,
    tau FLOAT NOT NULL,
    target_ssim FLOAT NOT NULL,
    coeffs VARCHAR NOT NULL,
    details VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    UNIQUE (model_name, domain)
);
"""
_MODELS = """
CREATE TABLE models (
    id INTEGER PRIMARY KEY DEFAULT nextval('models_id_seq'),
    name VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    sha256 VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    preprocessing VARCHAR NOT NULL,
    input_shape INTEGER[] NOT NULL,
    layout VARCHAR NOT NULL,
    labels VARCHAR[] NOT NULL,
    num_classes INTEGER NOT NULL,
    macs BIGINT NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    UNIQUE (name, version)
);
"""
_IMAGES = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY DEFAULT nextval('images_id_seq'),
    name VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    path VARCHAR,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    sha256 VARCHAR NOT NULL,
    pixels BLOB NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    UNIQUE (name, version)
);
"""
# Version 4: images keep their samples' type (``dtype``: uint8, or float32 in [0, 1] for
# deeper images: 16-bit, float, DICOM), so the catalog explains the pixels the API does.
_IMAGE_DTYPE = "ALTER TABLE images ADD COLUMN dtype VARCHAR NOT NULL DEFAULT 'uint8';"
# Version 5: datasets explained by ``explain_dataset`` (their heat maps live in the Parquet
# dataset at ``location``; the catalog keeps what ran, one row per image and call, append-only).
_DATASETS = """
CREATE SEQUENCE IF NOT EXISTS datasets_id_seq START 1;
CREATE TABLE IF NOT EXISTS datasets (
    id BIGINT PRIMARY KEY DEFAULT nextval('datasets_id_seq'),
    location VARCHAR NOT NULL,
    model_id INTEGER NOT NULL,
    settings VARCHAR NOT NULL,
    settings_sha256 VARCHAR NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    UNIQUE (location, settings_sha256)
);
CREATE TABLE IF NOT EXISTS dataset_runs (
    dataset_id BIGINT NOT NULL,
    job VARCHAR NOT NULL,
    image VARCHAR NOT NULL,
    image_sha256 VARCHAR,
    status VARCHAR NOT NULL,
    error VARCHAR,
    part VARCHAR,
    target_class INTEGER,
    cells INTEGER,
    seconds FLOAT,
    worker VARCHAR,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
"""
# Version 2 added ``tuned_tau``; version 3 made models and images versioned and content-
# addressed (name no longer unique: (name, version) is; a sha256 per model). A version-2 file
# is migrated in place: the two tables rebuilt with version 1 for every row (ids kept, so
# runs keep pointing at them; models get sha256 'unknown': the file they came from may have
# changed since, and the next registration under the name compares against that).
MIGRATIONS = {
    1: _TUNED_TAU,
    2: "ALTER TABLE models RENAME TO models_v2;" + _MODELS + """
INSERT INTO models SELECT id, name, 1, 'unknown', source, preprocessing, input_shape, layout,
    labels, num_classes, macs, registered_at FROM models_v2;
DROP TABLE models_v2;
ALTER TABLE images RENAME TO images_v2;""" + _IMAGES + """
INSERT INTO images SELECT id, name, 1, path, width, height, channels, sha256, pixels,
    registered_at FROM images_v2;
DROP TABLE images_v2;
""",
    3: _IMAGE_DTYPE,
    4: _DATASETS,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE SEQUENCE IF NOT EXISTS models_id_seq START 1;
""" + _MODELS + """
CREATE TABLE IF NOT EXISTS model_layers (
    model_id INTEGER NOT NULL,
    ordinal INTEGER NOT NULL,
    node_name VARCHAR NOT NULL,
    op VARCHAR NOT NULL,
    inputs VARCHAR[] NOT NULL,
    params VARCHAR NOT NULL,
    output_shape INTEGER[] NOT NULL,
    macs BIGINT NOT NULL,
    PRIMARY KEY (model_id, ordinal)
);
CREATE SEQUENCE IF NOT EXISTS images_id_seq START 1;
""" + _IMAGES + _IMAGE_DTYPE + """
CREATE SEQUENCE IF NOT EXISTS runs_id_seq START 1;
CREATE TABLE IF NOT EXISTS runs (
    id BIGINT PRIMARY KEY DEFAULT nextval('runs_id_seq'),
    model_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    mode VARCHAR NOT NULL,
    settings VARCHAR NOT NULL,
    target_class INTEGER,
    timings VARCHAR NOT NULL,
    heatmap_h INTEGER NOT NULL,
    heatmap_w INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    status VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS heatmaps (
    run_id BIGINT NOT NULL, y INTEGER NOT NULL, x INTEGER NOT NULL, prob FLOAT NOT NULL
);
CREATE TABLE IF NOT EXISTS heatmap_probs (
    run_id BIGINT NOT NULL, y INTEGER NOT NULL, x INTEGER NOT NULL, class INTEGER NOT NULL,
    prob FLOAT NOT NULL
);
""" + _TUNED_TAU + _DATASETS

TABLES = ("meta", "models", "model_layers", "images", "runs", "heatmaps", "heatmap_probs",
          "tuned_tau", "datasets", "dataset_runs")
