"""segflow tests: real files, real zarr stores, real Dask clusters and Prefect flow runs."""
