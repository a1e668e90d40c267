from fm_ray.project.project import Project

__all__ = ["Project"]
