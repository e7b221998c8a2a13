"""IVM planner (installed as krypton_db.planner)."""
