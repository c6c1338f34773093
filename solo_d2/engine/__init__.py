"""Training and evaluation engine of solo_d2 (Detectron2's ``engine``, for SOLO)."""
