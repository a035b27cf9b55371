"""covidct: COVID-19 diagnosis from a patient's chest CT series (Rahimzadeh et al. 2021)."""

__version__ = "0.1.0"
