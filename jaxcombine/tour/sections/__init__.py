"""The tour's sections: each ``run(tour) -> Section`` (see :mod:`jaxcombine.tour.run`)."""
