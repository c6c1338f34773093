"""Small helpers shared by solo_d2's packages."""
