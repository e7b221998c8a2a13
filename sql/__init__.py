"""SQL views, delta views and the query language (installed as krypton_db.sql)."""
