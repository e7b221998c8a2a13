-- The catalog layout of schema versions 1 and 2 (version 2 = this + the tuned_tau table of
-- krypton_db.catalog.MIGRATIONS[1]), kept to test the migrations of old files.
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE SEQUENCE IF NOT EXISTS models_id_seq START 1;
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY DEFAULT nextval('models_id_seq'),
    name VARCHAR NOT NULL UNIQUE,
    source VARCHAR NOT NULL,
    preprocessing VARCHAR NOT NULL,
    input_shape INTEGER[] NOT NULL,
    layout VARCHAR NOT NULL,
    labels VARCHAR[] NOT NULL,
    num_classes INTEGER NOT NULL,
    macs BIGINT NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
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
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY DEFAULT nextval('images_id_seq'),
    name VARCHAR NOT NULL UNIQUE,
    path VARCHAR,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    sha256 VARCHAR NOT NULL,
    pixels BLOB NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
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
