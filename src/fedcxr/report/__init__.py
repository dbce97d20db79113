"""The study report: Markdown and self-contained HTML built from the pipeline's metrics files.

Import what you need from its modules (`fedcxr.report.render`, `.inputs`, `.gradcam`): this
package file loads nothing, so that evaluation can use Grad-CAM without the report's code.
"""
